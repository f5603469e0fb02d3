"""GLM-4.1V / GLM-4.5V (``glm4v``): Qwen2-VL's LLM side (2x2 merger, 3-D M-RoPE from the model's own
``get_rope_index``), no CLS token, the tower not hooked (no vision stages).

What differs from Qwen2-VL:

- one placeholder for both media: the processor writes every frame of a video as image tokens
  (``image_token_id``), ``<|begin_of_image|> <|image|>... <|end_of_image|>{t}`` per temporal patch (``t`` the
  whole seconds of its first frame), the frames between ``<|begin_of_video|>`` and ``<|end_of_video|>``; the
  processor's ``mm_token_type_ids`` tells them apart (1 image, 2 video). The timestamps and markers are text:
  never pruned.
- ``get_rope_index`` needs ``mm_token_type_ids`` (the processor's) and splits ``video_grid_thw`` per temporal
  patch itself: positions come from it on the full sequence, then the engine gathers them.
- the LLM's RoPE rotates only the first half of each head (``partial_rotary_factor`` 0.5), pairs interleaved
  (``rope_layout``): signals read without RoPE are undone that way.
"""
import torch

from .qwen2_vl import Qwen2VLAdapter


class Glm4vAdapter(Qwen2VLAdapter):
    family = "glm4v"
    model_types = ("glm4v",)
    rope_layout = "interleaved"
    video_with_images = False  # the model's forward takes every image token as an image and as a video token

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """One placeholder id: a video's frames are image tokens too."""
        return (self.config.image_token_id,)

    def video_token_mask(self, inputs, reqs) -> list[torch.Tensor]:
        """Per row, [N_vis] bool: the visual tokens the processor typed as video (``mm_token_type_ids`` 2)."""
        ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
        vis = ids == self.config.image_token_id
        return [types[b][vis[b]] == 2 for b in range(ids.shape[0])]

    def video_inputs(self, videos: list) -> dict:
        """The engine sampled the frames already: the processor keeps them (its own fps sampling off) and
        reads their times from the metadata for the timestamp text."""
        return dict(super().video_inputs(videos), do_sample_frames=False)


# ---- the family's test, world and bench models (read by tokensieve.testing and eval/; see adapters/__init__.py) ----
PLACEHOLDERS = {"image_token_id": "<|image|>", "video_token_id": "<|video|>",  # config field -> test token
                "image_start_token_id": "<|begin_of_image|>", "image_end_token_id": "<|end_of_image|>",
                "video_start_token_id": "<|begin_of_video|>", "video_end_token_id": "<|end_of_video|>"}
CHAT_TEMPLATE = (  # the test tokenizer's chat template, GLM's media markers in Qwen's turn format (images first)
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|> "
    "{% elif c['type'] == 'video' %}<|begin_of_video|><|video|><|end_of_video|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
BENCH = None  # no benchmark configuration
PIXELS = (112 * 112, 28 * 28 * 15000)  # the checkpoints' image processor: fewest and most pixels an image is resized to


def processor(config, tok, pixels: tuple[int, int] = PIXELS, **image):
    """GLM-4V's processor of ``config``'s tower geometry (patch, merge, temporal patch) for the test tokenizer
    ``tok``, resizing images (and each video, all frames together) to between ``pixels`` = (fewest, most)."""
    from transformers import Glm4vProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    vc = config.vision_config
    geometry = dict(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size,
                    size={"shortest_edge": pixels[0], "longest_edge": pixels[1]}, **image)
    video = Glm4vVideoProcessor(**geometry, max_image_size={"longest_edge": pixels[1]})
    return Glm4vProcessor(image_processor=Glm4vImageProcessorPil(**geometry), tokenizer=tok, video_processor=video,
                          chat_template=CHAT_TEMPLATE)


def tiny_text(tok) -> dict:
    """The tiny test models' GLM-4 LM (width 64, 4 layers, head 16, RoPE on 8 of 16 dims, M-RoPE) as config fields."""
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=0, bos_token_id=2, eos_token_id=7,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "partial_rotary_factor": 0.5})


def tiny_vision() -> dict:
    """The tiny tower: 2 blocks, patch 4, 2 x 2 merger, a 16 px position-embedding grid (interpolated)."""
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                temporal_patch_size=2, in_channels=3, out_hidden_size=64, image_size=16)


def tiny_model(tok):
    """(tiny random model, processor) for ``tokensieve.testing.make_tiny``: 16 to 64 x 64 px images, patch 4."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    ids = {field: tok.convert_tokens_to_ids(token) for field, token in PLACEHOLDERS.items()}
    cfg = Glm4vConfig(text_config=tiny_text(tok), vision_config=tiny_vision(), **ids)
    return Glm4vForConditionalGeneration(cfg), processor(cfg, tok, pixels=(16 * 16, 64 * 64))

"""Qwen2-VL: no CLS token, 2x2 patch merger, 3-D M-RoPE positions from ``get_rope_index``."""
import torch

from .base import Adapter, grid_coords


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    contiguous_refused = ("its M-RoPE gives each visual token a (t, h, w) position, which has no 0..L-1 renumbering "
                          "that keeps the grid; kept tokens keep their original 3-D positions (as vLLM's Qwen path "
                          "does: EVS, recompute_mrope_positions)")
    model_types = ("qwen2_vl",)

    @property
    def video_token(self) -> str:
        return self.processor.video_token

    def encode_images(self, inputs, **kwargs) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], **kwargs)
        return list(out.pooler_output)

    def video_inputs(self, videos: list) -> dict:
        """As qwen-vl-utils: the per-frame pixel cap on (transformers' video processor asks which to use)."""
        kwargs = super().video_inputs(videos)
        if hasattr(type(self.processor.video_processor), "cap_pixels_per_frame"):
            kwargs["cap_pixels_per_frame"] = True
        return kwargs

    def encode_videos(self, inputs, **kwargs) -> list[torch.Tensor]:
        out = self.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        return list(out.pooler_output)

    def image_coords(self, inputs) -> list[torch.Tensor]:
        return self._grid_coords(inputs["image_grid_thw"])

    def video_coords(self, inputs) -> list[torch.Tensor]:
        """(t, row, col) on the merged grid: LLM video token k of a video is temporal patch t (frames 2t, 2t+1)."""
        return self._grid_coords(inputs["video_grid_thw"])

    def _grid_coords(self, grid_thw) -> list[torch.Tensor]:
        m = self.config.vision_config.spatial_merge_size
        return [torch.cat([grid_coords(int(h) // m, int(w) // m, item=f) for f in range(int(t))])
                for t, h, w in grid_thw.tolist()]

    def position_ids(self, inputs) -> torch.Tensor:
        """[4, B, L]: text positions (row 0, used for masks) and the three M-RoPE axes, as ``generate`` does."""
        text = super().position_ids(inputs)
        rope, _ = self.model.model.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs["attention_mask"], mm_token_type_ids=inputs.get("mm_token_type_ids"),
            **self._rope_kwargs(inputs))
        return torch.cat([text[None], rope], dim=0)

    def _rope_kwargs(self, inputs) -> dict:
        return {}

    def tower_sequences(self, inputs) -> list[list[int]]:
        return [[int(t) * int(h) * int(w)] for t, h, w in inputs["image_grid_thw"].tolist()]

    def video_tower_sequences(self, inputs) -> list[list[int]]:
        return [[int(t) * int(h) * int(w)] for t, h, w in inputs["video_grid_thw"].tolist()]


# ---- the family's test, world and bench models (read by tokensieve.testing and eval/; see adapters/__init__.py) ----
PLACEHOLDERS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",  # config field -> test token
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
CHAT_TEMPLATE = (  # the test tokenizer's chat template in Qwen's turn format (images first, then the text)
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
BENCH = None  # no benchmark configuration (Qwen2.5-VL's stands for the Qwen towers)
PIXELS = (56 * 56, 28 * 28 * 1280)  # the checkpoints' processor: fewest and most pixels an image is resized to


def qwen_processor(processor_class: str, config, tok, pixels: tuple[int, int] = PIXELS, **image):
    """A ``processor_class`` (transformers' name) of ``config``'s tower geometry (patch, merge, temporal patch),
    resizing images to between ``pixels`` = (fewest, most) pixels, for the test tokenizer ``tok``; ``image``:
    extra settings of the image and video processors (``image_mean``, ``image_std``)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vc = config.vision_config
    geometry = dict(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size,
                    size={"shortest_edge": pixels[0], "longest_edge": pixels[1]}, **image)
    return getattr(transformers, processor_class)(
        image_processor=Qwen2VLImageProcessorPil(**geometry), tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**geometry), chat_template=CHAT_TEMPLATE)


def processor(config, tok, pixels: tuple[int, int] = PIXELS, **image):
    """Qwen2-VL's processor of ``config``'s geometry (``qwen_processor``)."""
    return qwen_processor("Qwen2VLProcessor", config, tok, pixels, **image)


def tiny_text(tok) -> dict:
    """The tiny test models' Qwen2 LM (width 64, 4 layers, M-RoPE) as config fields."""
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=0, bos_token_id=2, eos_token_id=7,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]})


def tiny_vision() -> dict:
    """The tiny test models' tower (2 blocks, patch 4, 2 x 2 merger) as config fields."""
    return dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                temporal_patch_size=2, in_channels=3)


def placeholder_ids(tok) -> dict:
    """The placeholder token ids of the test tokenizer ``tok``, as config fields."""
    return {field: tok.convert_tokens_to_ids(token) for field, token in PLACEHOLDERS.items()}


def tiny_model(tok):
    """(tiny random model, processor) for ``tokensieve.testing.make_tiny``: 16 to 64 x 64 px images, patch 4."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(text_config=tiny_text(tok), vision_config=dict(tiny_vision(), hidden_size=64),
                        **placeholder_ids(tok))
    return Qwen2VLForConditionalGeneration(cfg), processor(cfg, tok, pixels=(16 * 16, 64 * 64))

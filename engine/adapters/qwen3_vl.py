"""Qwen3-VL (``qwen3_vl``, and ``qwen3_vl_moe`` through this adapter): Qwen2.5-VL's LLM side (2x2 merger,
interleaved M-RoPE from the model's own ``get_rope_index``), no CLS token, plus DeepStack.

DeepStack: the tower layers ``vision_config.deepstack_visual_indexes`` each go through their own merger;
``get_image_features`` / ``get_video_features`` return them as ``deepstack_features``, one [N, D] per layer,
aligned with the LLM's visual tokens. The engine keeps them aligned with the surviving tokens
(``deepstack.py``): hooks after decoder layers 0..n-1 add them at the visual tokens alive there.

Native video: the processor writes ``<{t:.1f} seconds>`` before each temporal patch's ``<|vision_start|>``
(the mean time of its two frames, from the video metadata); that text is never pruned. ``get_rope_index``
splits ``video_grid_thw`` per temporal patch itself: positions come from it on the full sequence, then the
engine gathers them.
"""
import torch

from . import deepstack
from .qwen2_vl import CHAT_TEMPLATE, PLACEHOLDERS  # noqa: F401 (the family's, as Qwen2-VL's)
from .qwen2_vl import Qwen2VLAdapter, placeholder_ids


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")

    @property
    def deepstack_layers(self) -> int:
        """How many LLM layers (0..n-1) receive DeepStack features after them."""
        return len(self.config.vision_config.deepstack_visual_indexes)

    def new_deepstack(self) -> deepstack.DeepStack:
        return deepstack.DeepStack(n_layers=self.deepstack_layers)

    def install_hooks(self, state_kwarg: str) -> list:
        return deepstack.install(self.llm_layers, self.deepstack_layers, state_kwarg)

    def encode_images(self, inputs, stack: deepstack.DeepStack | None = None, **kwargs) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], **kwargs)
        if stack is not None:
            stack.images = _per_item(out.deepstack_features)
        return list(out.pooler_output)

    def encode_videos(self, inputs, stack: deepstack.DeepStack | None = None, **kwargs) -> list[torch.Tensor]:
        out = self.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        if stack is not None:
            stack.videos = _per_item(out.deepstack_features)
        return list(out.pooler_output)

    def video_inputs(self, videos: list) -> dict:
        """The engine sampled the frames already: the processor keeps them (its own fps sampling off) and
        reads their times from the metadata for the timestamp text."""
        return dict(super().video_inputs(videos), do_sample_frames=False)


def _per_item(layers: list) -> list[torch.Tensor]:
    """DeepStack output (per layer, a tuple of per-item [N_i, D]) -> per item [n_layers, N_i, D]."""
    return [torch.stack(parts) for parts in zip(*layers)]


# ---- the family's test, world and bench models (read by tokensieve.testing and eval/; see adapters/__init__.py) ----
# PLACEHOLDERS and CHAT_TEMPLATE: Qwen2-VL's (imported above); the processor turns the video placeholder into
# one timestamped <|vision_start|> ... <|vision_end|> run per temporal patch
BENCH = {"model": "qwen3-vl-8b", "image": (768, 768)}  # eval/bench/configs/qwen3-vl-8b.json; 576 tokens merged (patch 16, 2 x 2)
PIXELS = (64 * 64, 32 * 32 * 1280)  # patch 16 x merge 2: fewest and most pixels an image is resized to


def processor(config, tok, pixels: tuple[int, int] = PIXELS, **image):
    """Qwen3-VL's processor of ``config``'s tower geometry (patch, merge, temporal patch) for the test tokenizer
    ``tok``, resizing images (and each video, all frames together) to between ``pixels`` = (fewest, most)."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    vc = config.vision_config
    geometry = dict(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size,
                    size={"shortest_edge": pixels[0], "longest_edge": pixels[1]}, **image)
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(**geometry), tokenizer=tok,
                            video_processor=Qwen3VLVideoProcessor(**geometry), chat_template=CHAT_TEMPLATE)


def tiny_text(tok) -> dict:
    """The tiny test models' Qwen3 LM (width 64, 4 layers, head 16, interleaved M-RoPE) as config fields."""
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=0, bos_token_id=2,
                eos_token_id=7, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [4, 2, 2], "mrope_interleaved": True})


def tiny_vision() -> dict:
    """The tiny tower: 3 blocks, patch 4, 2 x 2 merger, DeepStack from blocks 0, 1 and 2 (into LLM layers 0-2)."""
    return dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                temporal_patch_size=2, in_channels=3, out_hidden_size=64, num_position_embeddings=64,
                deepstack_visual_indexes=[0, 1, 2])


def tiny_model(tok):
    """(tiny random model, processor) for ``tokensieve.testing.make_tiny``: 16 to 64 x 64 px images, patch 4."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(text_config=tiny_text(tok), vision_config=tiny_vision(), **placeholder_ids(tok))
    return Qwen3VLForConditionalGeneration(cfg), processor(cfg, tok, pixels=(16 * 16, 64 * 64))


def tiny_moe_model(tok):
    """(tiny random Qwen3-VL-MoE model, processor): the tiny model's geometry, 4 experts (2 per token) per layer."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = dict(tiny_text(tok), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    cfg = Qwen3VLMoeConfig(text_config=text, vision_config=tiny_vision(), **placeholder_ids(tok))
    return Qwen3VLMoeForConditionalGeneration(cfg), processor(cfg, tok, pixels=(16 * 16, 64 * 64))

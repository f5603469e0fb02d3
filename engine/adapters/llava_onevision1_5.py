"""LLaVA-OneVision-1.5 (``llava_onevision1_5``): a RICE-ViT tower, Qwen2-VL-like (``image_grid_thw``, 2-D
rotary, a 2x2 patch merger), and a Qwen3 LLM with plain 1-D positions. The tower is not hooked (no vision
stages).

What differs from Qwen2-VL:

- positions are 1-D (the LLM has no M-RoPE; transformers' model builds ``arange`` positions and generates
  with the default 1-D ones): ``position_ids`` is the base adapter's, from the attention mask.
- no temporal patch: the tower's patch embedding is a 2-D convolution (the processors' ``temporal_patch_size``
  is 1), so a video's grid has one temporal index per frame, and every image and every frame is its own
  sequence in the tower.
- the tower prepends a class embedding to every image and frame (``cls_embeddings``); its layers attend to it,
  then it is dropped before the merger: the LLM never sees it. The engine cannot record it: the tower runs
  packed sequences ([sum of lengths, C] with ``cu_seqlens``), not the [n, 1 + P, C] batches the engine's tower
  hooks and CLS records read, so ``cls_tower`` and ``hooked_tower`` are False and CLS / tower-attention pruners
  are refused (``engine/fit.py``).
- a video enters natively as the processor writes it: one run of ``<|video_pad|>`` tokens between
  ``<|vision_start|>`` and ``<|vision_end|>`` (no timestamps: the processor writes none); ``second_per_grid_ts``
  is accepted by the forward and unused.
"""
import torch

from .base import Adapter
from .qwen2_vl import CHAT_TEMPLATE, PLACEHOLDERS  # noqa: F401 (the family's, as Qwen2-VL's: the same placeholders)
from .qwen2_vl import Qwen2VLAdapter, placeholder_ids


class LlavaOnevision15Adapter(Qwen2VLAdapter):
    family = "llava_onevision1_5"
    model_types = ("llava_onevision1_5",)

    def position_ids(self, inputs) -> torch.Tensor:
        """[B, L]: 1-D positions from the attention mask, as ``generate`` builds them (no M-RoPE)."""
        return Adapter.position_ids(self, inputs)

    def tower_sequences(self, inputs) -> list[list[int]]:
        """Per image, its one tower sequence: its patches and the class token."""
        return _frame_sequences(inputs["image_grid_thw"])

    def video_tower_sequences(self, inputs) -> list[list[int]]:
        """Per video, one tower sequence per frame: its patches and the class token."""
        return _frame_sequences(inputs["video_grid_thw"])


def _frame_sequences(grid_thw: torch.Tensor) -> list[list[int]]:
    """[n, 3] (t, h, w) grids -> per item, t sequences of h * w patches + 1 class token."""
    return [[int(h) * int(w) + 1] * int(t) for t, h, w in grid_thw.tolist()]


# ---- the family's test, world and bench models (read by tokensieve.testing and eval/; see adapters/__init__.py) ----
# PLACEHOLDERS and CHAT_TEMPLATE: Qwen2-VL's (imported above; the checkpoints use Qwen's tokens and turns)
BENCH = None  # no benchmark configuration
PIXELS = (56 * 56, 28 * 28 * 1280)  # Qwen2-VL's processor defaults: fewest and most pixels an image is resized to


def processor(config, tok, pixels: tuple[int, int] = PIXELS, **image):
    """The family's processor (transformers' ``Exaone4_5_Processor`` over Qwen2-VL's image and video processors,
    as its auto mappings give) of ``config``'s tower geometry (patch, merge; temporal patch 1: the tower has
    none) for the test tokenizer ``tok``, resizing images (and each frame) to between ``pixels`` = (fewest, most);
    ``image``: extra settings of the image and video processors (``image_mean``, ``image_std``)."""
    from transformers import Exaone4_5_Processor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vc = config.vision_config
    geometry = dict(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=1,
                    size={"shortest_edge": pixels[0], "longest_edge": pixels[1]}, **image)
    return Exaone4_5_Processor(image_processor=Qwen2VLImageProcessorPil(**geometry), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor(**geometry), chat_template=CHAT_TEMPLATE)


def tiny_text(tok) -> dict:
    """The tiny test models' Qwen3 LM (width 64, 4 layers, head 16, 1-D RoPE) as config fields."""
    return dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=0,
                bos_token_id=2, eos_token_id=7, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def tiny_vision() -> dict:
    """The tiny RICE tower: 2 blocks, width 32, 4 heads, patch 4, 2 x 2 merger into the LM's width 64."""
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                in_channels=3, out_hidden_size=64)


def tiny_model(tok):
    """(tiny random model, processor) for ``tokensieve.testing.make_tiny``: 16 to 64 x 64 px images, patch 4."""
    from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration

    cfg = LlavaOnevision15Config(text_config=tiny_text(tok), vision_config=tiny_vision(), tie_word_embeddings=False,
                                 **placeholder_ids(tok))
    return LlavaOnevision15ForConditionalGeneration(cfg), processor(cfg, tok, pixels=(16 * 16, 64 * 64))

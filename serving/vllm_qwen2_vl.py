"""Qwen2-VL in vLLM with tokensieve's per-request plans: vLLM's own processor and model behind tokensieve's Qwen
mixins (``vllm_qwen``: the plan field, the shrunk placeholders, the pruned features with their original 3-D
M-RoPE positions).

Registered by ``vllm_plugin.register`` for ``Qwen2VLForConditionalGeneration``. vLLM's Qwen2-VL has no
``recompute_mrope_positions`` of its own (stock vLLM ignores ``--video-pruning-rate`` there): the model borrows
Qwen2.5-VL's, which reads the same 4 position channels.

Loading fix: the shipped tiny-qwen2-vl's config has ``rope_type: longrope`` with ``mrope_section``; transformers
builds M-RoPE with longrope's frequencies (inv_freq / short_factor, attention factor 1 at factor 1), vLLM a 1-D
longrope rotary that crashes on 3-D positions. The model reads the config as plain M-RoPE and rebuilds its
rotary tables with transformers' frequencies (``longrope_as_mrope``, ``scale_rotary``).
"""
from __future__ import annotations

import torch
from vllm.model_executor.layers.rotary_embedding.mrope import MRotaryEmbedding
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder, Qwen2VLForConditionalGeneration,
                                                 Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .vllm_qwen import PlanModel, PlanProcessor


class TokenSieveQwen2VLProcessor(PlanProcessor, Qwen2VLMultiModalProcessor):
    """vLLM's Qwen2-VL processor; with a plan, each image's / video's placeholder run shrinks to the kept count."""


def longrope_as_mrope(config) -> list[float] | None:
    """A text config with ``rope_type: longrope`` and ``mrope_section`` (the loading fix, in place on vLLM's
    config): read as plain M-RoPE, returning the short factors the caller scales its rotary tables by (None:
    not such a config). Refused where transformers would scale the attention or switch to the long factors."""
    text = config.get_text_config()
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if rope.get("rope_type") != "longrope" or "mrope_section" not in rope:
        return None
    if float(rope.get("factor", 1.0)) > 1.0 or rope.get("attention_factor", 1.0) != 1.0:
        raise ValueError("tokensieve: a Qwen2-VL longrope config with a scaling factor > 1 is not supported in vLLM")
    text.rope_parameters = {"rope_type": "default", "rope_theta": rope["rope_theta"],
                            "mrope_section": rope["mrope_section"]}
    return [float(f) for f in rope["short_factor"]]


def scale_rotary(model: torch.nn.Module, short_factor: list[float]) -> None:
    """Rebuild each M-RoPE table of ``model`` with transformers' longrope frequencies (at a length up to
    ``original_max_position_embeddings``): inv_freq = 1 / (short_factor * base^(2i / d))."""
    for m in model.modules():
        if isinstance(m, MRotaryEmbedding):
            d = m.rotary_dim
            inv = 1.0 / (torch.tensor(short_factor) * m.base ** (torch.arange(0, d, 2, dtype=torch.float) / d))
            freqs = torch.outer(torch.arange(m.cos_sin_cache.shape[0], dtype=torch.float), inv)
            m.cos_sin_cache.copy_(torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(m.cos_sin_cache.dtype))


@MULTIMODAL_REGISTRY.register_processor(TokenSieveQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class TokenSieveQwen2VL(PlanModel, Qwen2VLForConditionalGeneration, SupportsMultiModalPruning):
    """vLLM's Qwen2-VL; ``embed_multimodal`` runs each item's plan and returns the kept rows with their
    original M-RoPE positions (``vllm_qwen.PlanModel``)."""

    recompute_mrope_positions = Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions

    def __init__(self, *, vllm_config, prefix: str = ""):
        short_factor = longrope_as_mrope(vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if short_factor is not None:
            scale_rotary(self.language_model, short_factor)

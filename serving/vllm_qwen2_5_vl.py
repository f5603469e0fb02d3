"""Qwen2.5-VL in vLLM with tokensieve's per-request plans: vLLM's own processor and model behind tokensieve's Qwen
mixins (``vllm_qwen``). Registered by ``vllm_plugin.register`` for ``Qwen2_5_VLForConditionalGeneration``.

vLLM's Qwen2.5-VL implements ``SupportsMultiModalPruning`` for EVS (``--video-pruning-rate``): its
``embed_multimodal`` appends positions only when that engine-wide rate is set. Without EVS this model's
``embed_multimodal`` is the mixin's (positions always, a plan per item); with EVS on it is vLLM's own, and
requests with a plan are refused (``vllm_qwen.PlanProcessor``): both would prune the same placeholders. A
video's temporal positions step by ``tokens_per_second * second_per_grid_ts`` (floored), as vLLM's own rope
index (``iter_mm_grid_thw``) and transformers' ``get_rope_index`` number them.
"""
from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from .vllm_qwen import PlanModel, PlanProcessor


class TokenSieveQwen2_5_VLProcessor(PlanProcessor, Qwen2_5_VLMultiModalProcessor):
    """vLLM's Qwen2.5-VL processor; with a plan, each image's / video's placeholder run shrinks to the kept count."""

    family = "qwen2_5_vl"


@MULTIMODAL_REGISTRY.register_processor(TokenSieveQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class TokenSieveQwen2_5_VL(PlanModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; ``embed_multimodal`` runs each item's plan and returns the kept rows with their original
    M-RoPE positions (``vllm_qwen.PlanModel``)."""

    def tokensieve_positions(self, modality, item_input, grids):
        """A video's t steps by tokens_per_second * second_per_grid_ts (floored), an image's by one."""
        if modality == "image":
            return super().tokensieve_positions(modality, item_input, grids)
        seconds = item_input.get("second_per_grid_ts")
        seconds = [1.0] * len(grids) if seconds is None else [float(s) for s in seconds]
        tps = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
        merge = self.visual.spatial_merge_size
        return [compute_mrope_for_media(torch.tensor(g), merge, tokens_per_second=tps, video_second_per_grid=s)
                for g, s in zip(grids, seconds)]

"""LLaVA-1.5 in vLLM with tokensieve's per-request plans: subclasses of vLLM's own processor and model.

Registered by ``vllm_plugin.register`` for the architecture ``LlavaForConditionalGeneration`` (vLLM's
``ModelRegistry`` and ``MULTIMODAL_REGISTRY``, its documented extension points). Without a plan every method
falls through to vLLM's.

Loading fix: checkpoints saved by transformers 5.x name the CLIP tower's weights ``vision_tower.embeddings...``
(no ``.vision_model.``), which vLLM's mapper does not expect: ``hf_to_vllm_mapper`` inserts it.
"""
from __future__ import annotations

import re

import torch
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from . import vllm_common as common


class TokenSieveLlavaProcessor(LlavaMultiModalProcessor):
    """vLLM's LLaVA processor; with a plan, each image's placeholder run shrinks to the kept count."""

    def _call_hf_processor(self, hf_data, hf_kwargs):
        plan = common.request_plan(self.info.ctx, hf_kwargs)  # refused here: before any model work
        out = super()._call_hf_processor(hf_data, common.without_plan(hf_kwargs))
        if "pixel_values" in out:
            out[common.FIELD] = common.plan_field(plan, len(out["pixel_values"]))
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        config[common.FIELD] = MultiModalFieldConfig.batched("image")
        return config

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return common.shrink(updates, common.request_plan(self.info.ctx, hf_processor_mm_kwargs))


def grid(side: int, n: int) -> torch.Tensor:
    """[n, 3] (item 0, row, col) of an image's LLM tokens: a side x side patch grid, after the CLS token
    (placed at (0, 0, side), as tokensieve's LLaVA adapter does) when n = side^2 + 1 ("full" strategy)."""
    r = torch.arange(side).repeat_interleave(side)
    c = torch.arange(side).repeat(side)
    patches = torch.stack([torch.zeros_like(r), r, c], dim=1)
    return torch.cat([torch.tensor([[0, 0, side]]), patches]) if n == side * side + 1 else patches


@MULTIMODAL_REGISTRY.register_processor(TokenSieveLlavaProcessor, info=LlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TokenSieveLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA; ``embed_multimodal`` runs each image's plan on its projected features."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): r"\1vision_tower.vision_model."},
    ) | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        common.announce(type(self).__name__)

    def embed_multimodal(self, **kwargs):
        field = kwargs.pop(common.FIELD, None)
        features = super().embed_multimodal(**kwargs)
        if field is None or len(features) == 0:
            return features
        item_plans = common.item_plans(field, len(features))
        if all(p is None for p in item_plans):
            return features
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return common.prune(list(features), item_plans, lambda i: grid(side, features[i].shape[0]))

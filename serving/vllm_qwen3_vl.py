"""Qwen3-VL in vLLM with tokensieve's per-request plans (images): vLLM's own processor and model behind tokensieve's
Qwen mixins (``vllm_qwen``). Registered by ``vllm_plugin.register`` for ``Qwen3VLForConditionalGeneration``.

DeepStack: vLLM's Qwen3-VL returns each item's merged features with its DeepStack features concatenated along
the channels ([N, visual_dim * (1 + levels)]) and splits them when it places them in the prompt. The plan reads
the main features only (``tokensieve_main_channels``), as tokensieve's engine does, and the kept rows carry all
channels (a merged token: the mean of its originals' DeepStack features, as the engine's ``group_mean``).

Positions: vLLM's Qwen3-VL recompute reads 5 channels per item ([t, h, w, grid width, 0] for an image, vLLM's
own EVS layout); the model appends a sixth, whether the item was pruned. A request with nothing pruned keeps
the positions vLLM computed for it (its recompute would have to handle Qwen3-VL's per-frame video layout,
which only its EVS path builds); one with a pruned image goes through vLLM's recompute.

Videos: Qwen3-VL's video placeholder interleaves timestamp text with each temporal patch's tokens, which the
plugin does not shrink: a video request with a plan is refused (``vllm_common.shrink``); without a plan it is
served as stock vLLM serves it.
"""
from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import vllm_common as common
from .vllm_qwen import PlanModel, PlanProcessor


class TokenSieveQwen3VLProcessor(PlanProcessor, Qwen3VLMultiModalProcessor):
    """vLLM's Qwen3-VL processor; with a plan, each image's placeholder run shrinks to the kept count."""

    family = "qwen3_vl"


@MULTIMODAL_REGISTRY.register_processor(TokenSieveQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class TokenSieveQwen3VL(PlanModel, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL; ``embed_multimodal`` runs each image's plan on its main features and returns the kept rows
    (all channels, DeepStack included) with their original M-RoPE positions and a pruned flag."""

    POSITION_CHANNELS = 6  # [t, h, w, grid width, 0]: vLLM's Qwen3-VL layout; then 1.0 where the item was pruned

    def tokensieve_main_channels(self) -> int:
        return self.visual_dim

    def _tokensieve_items(self, modality: str, item_input, field) -> list[torch.Tensor]:
        """Images: the mixin's, flagged per item; videos (never pruned here): vLLM's features, flagged unpruned."""
        if modality == "video":
            return [torch.cat([f, f.new_zeros(f.shape[0], self.POSITION_CHANNELS)], dim=1)
                    for f in self._process_video_input(item_input)]
        out = super()._tokensieve_items(modality, item_input, field)
        for item, plan in zip(out, common.item_plans(field, len(out))):
            item[:, -1] = float(plan is not None)
        return out

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Nothing pruned in the request: its features and the positions vLLM computed; else vLLM's recompute."""
        if not any(bool(mm[:, -1].any()) for mm in multimodal_embeddings):
            n = len(input_ids)
            return ([mm[:, :-self.POSITION_CHANNELS] for mm in multimodal_embeddings], mrope_positions,
                    int(mrope_positions[:, :n].max()) + 1 - n)
        return super().recompute_mrope_positions(input_ids, [mm[:, :-1] for mm in multimodal_embeddings],
                                                 mrope_positions, num_computed_tokens)

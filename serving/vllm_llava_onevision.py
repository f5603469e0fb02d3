"""LLaVA-OneVision in vLLM with tokensieve's per-request plans: subclasses of vLLM's own processor and model.

Registered by ``vllm_plugin.register`` for ``LlavaOnevisionForConditionalGeneration``. An image is one item,
packed as on LLaVA-NeXT (base tile, then the anyres grid with row-end newlines, downscaled past
``anyres_max``), its coordinates from vLLM's own packing run on coordinates (``vllm_llava_next``). A native video
is one item: each frame's grid pooled 2x (the model's ``apply_pooling``), then one newline token after the last
frame; each token's frame, row and column as the engine's OneVision adapter numbers them. SigLIP has no CLS
token: pruners that read the tower run on their surrogates, as the engine runs them on this family.
"""
from __future__ import annotations

import math

import torch
from vllm.model_executor.models.llava_onevision import (LlavaOnevisionDummyInputsBuilder,
                                                        LlavaOnevisionForConditionalGeneration,
                                                        LlavaOnevisionMultiModalProcessor,
                                                        LlavaOnevisionProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..engine.adapters.base import grid_coords
from . import vllm_common as common
from .vllm_llava import VISION_MODEL_MAPPER, PlanProcessor
from .vllm_llava_next import image_coords

FIELDS = {"image": ("pixel_values", common.FIELD), "video": ("pixel_values_videos", common.FIELD + "_video")}


class TokenSieveLlavaOnevisionProcessor(PlanProcessor, LlavaOnevisionMultiModalProcessor):
    """vLLM's LLaVA-OneVision processor with tokensieve's plans, on images and videos."""

    plan_fields = FIELDS
    records_tower = False  # SigLIP: no CLS token; tower pruners use their surrogates
    family = "llava_onevision"

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        """vLLM's OneVision calls the Hugging Face processor here, not through ``_call_hf_processor``."""
        plan = self._plan(hf_kwargs)  # refused here: before any model work
        out = super()._apply_hf_processor_main(mm_items, common.without_plan(hf_kwargs))
        for key, field in self.plan_fields.values():
            if key in out:
                out[field] = common.plan_field(plan, len(out[key]))
        return out


def video_coords(model, n_frames: int) -> torch.Tensor:
    """[n_frames * p * p + 1, 3] (frame, row, col) of a video's tokens: each frame's pooled p x p grid
    (p = ceil(side / 2)), then the newline token after the last frame, at (last frame, p - 1, p)."""
    vc = model.config.vision_config
    p = math.ceil(vc.image_size // vc.patch_size / 2)
    grid = torch.cat([grid_coords(p, p, item=f) for f in range(n_frames)])
    return torch.cat([grid, torch.tensor([[n_frames - 1, p - 1, p]])])


@MULTIMODAL_REGISTRY.register_processor(TokenSieveLlavaOnevisionProcessor, info=LlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class TokenSieveLlavaOnevision(LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision; ``embed_multimodal`` runs each image's and video's plan on its features."""

    hf_to_vllm_mapper = VISION_MODEL_MAPPER | LlavaOnevisionForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        common.announce(type(self).__name__)

    def embed_multimodal(self, **kwargs):
        fields = {m: kwargs.pop(field, None) for m, (_, field) in FIELDS.items()}
        if all(f is None for f in fields.values()):
            return super().embed_multimodal(**kwargs)
        out = []
        for modality, inp in self._parse_and_validate_multimodal_inputs(**kwargs).items():  # vLLM's order
            if modality == "image" and inp["type"] != "pixel_values":
                out += list(self._process_image_input(inp))  # image embeddings: as vLLM
                continue
            if modality == "image":
                features = list(self._process_image_input(inp))
                tiles, sizes = inp["pixel_values"], inp["image_sizes"]
                coords = [image_coords(self, sizes[i], tiles[i].shape[0]) for i in range(len(features))]
                frames = lambda i: None  # noqa: E731
            else:
                features = [f.reshape(-1, f.shape[-1]) for f in self._process_video_pixels(inp)]
                videos = inp["pixel_values_videos"]
                coords = [video_coords(self, videos[i].shape[0]) for i in range(len(features))]
                frames = lambda i: coords[i][:, 0]  # noqa: E731
            plans_ = common.item_plans(fields[modality], len(features))
            out += common.prune(features, plans_, lambda i: coords[i], frames)
        return tuple(out)

"""Qwen2-VL in vLLM with tokensieve's per-request plans: subclasses of vLLM's own processor and model.

Registered by ``vllm_plugin.register`` for ``Qwen2VLForConditionalGeneration``. Kept tokens keep their 3-D
M-RoPE positions: ``embed_multimodal`` appends each kept token's original (t, h, w) position and the grid
width as 4 extra channels (vLLM's EVS convention, ``compute_mrope_for_media``), and vLLM's runner hands them
to ``recompute_mrope_positions`` (the ``SupportsMultiModalPruning`` interface; vLLM's own implementation,
Qwen2.5-VL's), which places them in the prompt and numbers the text after each item from there.

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
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from . import vllm_common as common
from .vllm_plugin import enable_mrope_recompute

FIELDS = {"image": common.FIELD, "video": common.FIELD + "_video"}  # modality -> the plan field of its items
GRIDS = {"image": "image_grid_thw", "video": "video_grid_thw"}


class TokenSieveQwen2VLProcessor(Qwen2VLMultiModalProcessor):
    """vLLM's Qwen2-VL processor; with a plan, each image's / video's placeholder run shrinks to the kept count."""

    def _call_hf_processor(self, hf_data, hf_kwargs):
        plan = common.request_plan(self.info.ctx, hf_kwargs, family="qwen2_vl")  # refused here: before any model work
        out = super()._call_hf_processor(hf_data, common.without_plan(hf_kwargs))
        for modality, grid in GRIDS.items():
            if grid in out:
                out[FIELDS[modality]] = common.plan_field(plan, len(out[grid]))
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        config.update({field: MultiModalFieldConfig.batched(m) for m, field in FIELDS.items()})
        return config

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        plan = common.request_plan(self.info.ctx, hf_processor_mm_kwargs, family="qwen2_vl")
        return common.shrink(updates, plan)


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


def item_grid(thw: list[int], merge: int) -> torch.Tensor:
    """[t * h/m * w/m, 3] (frame, row, col) of an item's LLM tokens, as tokensieve's Qwen2-VL adapter numbers them."""
    t, h, w = thw
    r = torch.arange(h // merge).repeat_interleave(w // merge)
    c = torch.arange(w // merge).repeat(h // merge)
    return torch.cat([torch.stack([torch.full_like(r, f), r, c], dim=1) for f in range(t)])


@MULTIMODAL_REGISTRY.register_processor(TokenSieveQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class TokenSieveQwen2VL(Qwen2VLForConditionalGeneration, SupportsMultiModalPruning):
    """vLLM's Qwen2-VL; ``embed_multimodal`` runs each item's plan and returns the kept rows with their
    original M-RoPE positions."""

    tokensieve_recomputes_mrope = True  # read by the runner fix (vllm_plugin.enable_mrope_recompute)
    recompute_mrope_positions = Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions

    def __init__(self, *, vllm_config, prefix: str = ""):
        short_factor = longrope_as_mrope(vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        enable_mrope_recompute()
        common.announce(type(self).__name__)
        if short_factor is not None:
            scale_rotary(self.language_model, short_factor)

    def embed_multimodal(self, **kwargs):
        fields = {m: kwargs.pop(f, None) for m, f in FIELDS.items()}
        modalities = self._parse_and_validate_multimodal_inputs(**kwargs)
        out = []
        merge = self.visual.spatial_merge_size
        for name, item_input in modalities.items():  # vLLM's order of modalities (its own embed_multimodal's)
            modality = "image" if name == "images" else "video"
            run = self._process_image_input if modality == "image" else self._process_video_input
            features = list(run(item_input))
            grids = item_input[GRIDS[modality]].tolist()
            plans_ = common.item_plans(fields[modality], len(features))
            coords = [item_grid(g, merge) for g in grids]
            positions = [compute_mrope_for_media(torch.tensor(g), merge) for g in grids]  # [N, 4]
            frames = (lambda i: coords[i][:, 0]) if modality == "video" else (lambda i: None)
            kept = common.prune(features, plans_, lambda i: coords[i], frames, with_index=True)
            for (feats, idx), pos in zip(kept, positions):
                out.append(torch.cat([feats, pos[idx].to(feats.device, feats.dtype)], dim=1))
        return tuple(out)

"""What tokensieve's Qwen families share in vLLM (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): a processor mixin and a model
mixin, each put in front of vLLM's own class of the family (``vllm_qwen2_vl``, ``vllm_qwen2_5_vl``,
``vllm_qwen3_vl``: a few lines each).

- ``PlanProcessor``: the request's plan is checked before any model work, travels to the encoder as one plan
  field per image / video, and each item's placeholder run shrinks to its kept count.
- ``PlanModel``: ``embed_multimodal`` runs each item's plan on its merged features and returns the kept rows
  with their original 3-D M-RoPE positions appended (vLLM's EVS convention, ``compute_mrope_for_media``: t, h,
  w and the grid width; ``POSITION_CHANNELS`` of them, Qwen3-VL pads a fifth). vLLM's runner hands them to
  the model's ``recompute_mrope_positions`` (``SupportsMultiModalPruning``), which places them in the prompt and
  numbers the text after each item from there; ``vllm_plugin.enable_mrope_recompute`` makes the runner call it
  for tokensieve's models whatever ``--video-pruning-rate`` says. An item without a plan keeps all its rows
  and its usual positions (the recompute of a full item is the identity), so a request without a plan gets
  what stock vLLM computes. With vLLM's own video pruning on (EVS, ``--video-pruning-rate``) the model runs
  vLLM's path and requests with a plan are refused.
"""
from __future__ import annotations

import dataclasses

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from . import vllm_common as common
from .vllm_plugin import enable_mrope_recompute

FIELDS = {"image": common.FIELD, "video": common.FIELD + "_video"}  # modality -> the plan field of its items
GRIDS = {"image": "image_grid_thw", "video": "video_grid_thw"}


class PlanProcessor:
    """In front of vLLM's Qwen processor: with a plan, each image's / video's placeholder run shrinks to the
    kept count; the plan travels to the model as a per-item field."""

    family = "qwen2_vl"  # tokensieve's family (``plans.VLLM_POSITIONS``: how vLLM numbers its pruned prompts)

    def _get_hf_mm_inputs(self, mm_items, hf_kwargs):
        """vLLM's first step of processing (every Qwen processor's, Qwen3-VL's too, which calls the Hugging Face
        processor itself): the plan is checked here, before any model work, taken out of the processor's
        kwargs, and joins the processed data as one plan field per item (vLLM's passthrough data)."""
        plan = common.request_plan(self.info.ctx, hf_kwargs, family=self.family)
        if plan is not None and evs_on(self.info.ctx.model_config):
            raise common.plans.PlanRefused("this server runs vLLM's own video pruning (--video-pruning-rate), "
                                           "which a plan cannot be combined with; start it without that flag")
        hf_data, kwargs, passthrough = super()._get_hf_mm_inputs(mm_items, common.without_plan(hf_kwargs))
        passthrough = dict(passthrough)
        for modality, field in FIELDS.items():
            if n := mm_items.get_count(modality, strict=False):
                passthrough[field] = common.plan_field(plan, n)
        return hf_data, kwargs, passthrough

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        config.update({field: MultiModalFieldConfig.batched(m) for m, field in FIELDS.items()})
        return config

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return common.shrink(updates, common.request_plan(self.info.ctx, hf_processor_mm_kwargs, family=self.family))


def evs_on(model_config) -> bool:
    """Whether vLLM's own engine-wide video pruning (EVS, ``--video-pruning-rate``) is on."""
    mm = model_config.get_multimodal_config() if model_config.is_multimodal_model else None
    return bool(mm is not None and mm.is_multimodal_pruning_enabled())


def item_grid(thw: list[int], merge: int) -> torch.Tensor:
    """[t * h/m * w/m, 3] (frame, row, col) of an item's LLM tokens, as tokensieve's Qwen adapters number them."""
    t, h, w = thw
    r = torch.arange(h // merge).repeat_interleave(w // merge)
    c = torch.arange(w // merge).repeat(h // merge)
    return torch.cat([torch.stack([torch.full_like(r, f), r, c], dim=1) for f in range(t)])


class PlanModel:
    """In front of vLLM's Qwen model class: ``embed_multimodal`` prunes each item by its plan and appends the
    kept tokens' original M-RoPE positions. Family hooks: ``POSITION_CHANNELS``, ``tokensieve_positions``,
    ``tokensieve_main_channels``."""

    tokensieve_recomputes_mrope = True  # read by the runner fix (vllm_plugin.enable_mrope_recompute)
    POSITION_CHANNELS = 4  # what the family's recompute_mrope_positions strips off each item

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        enable_mrope_recompute()
        common.announce(type(self).__name__)

    def get_encoder_cudagraph_config(self):
        """No encoder CUDA graphs (GPU only): they bypass ``embed_multimodal``, so the positions would be missing
        (vLLM turns them off for EVS for the same reason)."""
        return dataclasses.replace(super().get_encoder_cudagraph_config(), modalities=[])

    def tokensieve_positions(self, modality: str, item_input, grids: list[list[int]]) -> list[torch.Tensor]:
        """Per item [N_i, POSITION_CHANNELS] long: (t, h, w, grid width) as the family's rope index numbers them
        from the item's start (Qwen2-VL: a video's t steps by one per temporal patch)."""
        merge = self.visual.spatial_merge_size
        return [self._pad_positions(compute_mrope_for_media(torch.tensor(g), merge)) for g in grids]

    def _pad_positions(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.cat([pos, pos.new_zeros(pos.shape[0], self.POSITION_CHANNELS - pos.shape[1])], dim=1)

    def tokensieve_main_channels(self) -> int | None:
        """How many leading channels of an item's features the plan reads (None: all)."""
        return None

    def embed_multimodal(self, **kwargs):
        fields = {m: kwargs.pop(f, None) for m, f in FIELDS.items()}
        if getattr(self, "is_multimodal_pruning_enabled", False):  # vLLM's EVS is on: its own path (plans refused)
            return super().embed_multimodal(**kwargs)
        out = []
        for name, item_input in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            modality = "image" if name in ("image", "images") else "video"  # vLLM's order of modalities
            out += self._tokensieve_items(modality, item_input, fields[modality])
        return tuple(out)

    def _tokensieve_items(self, modality: str, item_input, field) -> list[torch.Tensor]:
        """One modality's items -> per item [k_i, C + POSITION_CHANNELS]: kept rows, then their positions."""
        run = self._process_image_input if modality == "image" else self._process_video_input
        features = list(run(item_input))
        grids = item_input[GRIDS[modality]].tolist()
        coords = [item_grid(g, self.visual.spatial_merge_size) for g in grids]
        positions = self.tokensieve_positions(modality, item_input, grids)
        frames = (lambda i: coords[i][:, 0]) if modality == "video" else (lambda i: None)
        kept = common.prune(features, common.item_plans(field, len(features)), lambda i: coords[i], frames,
                            with_index=True, main=self.tokensieve_main_channels())
        return [torch.cat([feats, pos[idx].to(feats.device, feats.dtype)], dim=1)
                for (feats, idx), pos in zip(kept, positions)]

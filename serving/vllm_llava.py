"""LLaVA-1.5 in vLLM with tokensieve's per-request plans: subclasses of vLLM's own processor and model.

Registered by ``vllm_plugin.register`` for the architecture ``LlavaForConditionalGeneration`` (vLLM's
``ModelRegistry`` and ``MULTIMODAL_REGISTRY``, its documented extension points). Without a plan every method
falls through to vLLM's.

The CLIP tower's signals (CLS attention, keys, values, q / k) are recorded for the pruners that read them
(``plans.RUNS_WITH_TOWER``: cls, visionzip, tome, flowcut, rollout, ...): forward hooks on this model's own
attention input projections (``qkv_proj``) of the layers a request's plan reads, for the one tower call of a
batch that has such a plan, and the projector's input, which pruners reading ``tower.features`` merge before
projecting. The record is the engine's (``engine.signals.record_tower``) on the same q / k / v.

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

from ..engine.signals import record_tower, tower_records
from ..pruners import TowerRecord, get_pruner
from . import plans
from . import vllm_common as common


class PlanProcessor:
    """Mixed into a vLLM LLaVA-style processor (LLaVA-1.5, NeXT, OneVision): with a plan, each item's placeholder
    run shrinks to the kept count, and the plan travels to the encoder in a per-item field (``plan_fields``)."""

    plan_fields = {"image": ("pixel_values", common.FIELD)}  # modality -> (HF output counting its items, field)
    records_tower = True  # the model records its (CLS) tower: pruners reading it get its signals
    family = "llava"  # tokensieve's family (``plans.VLLM_POSITIONS``: how vLLM numbers its pruned prompts)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        plan = self._plan(hf_kwargs)  # refused here: before any model work
        out = super()._call_hf_processor(hf_data, common.without_plan(hf_kwargs))
        for key, field in self.plan_fields.values():
            if key in out:
                out[field] = common.plan_field(plan, len(out[key]))
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        config.update({field: MultiModalFieldConfig.batched(m) for m, (_, field) in self.plan_fields.items()})
        return config

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return common.shrink(updates, self._plan(hf_processor_mm_kwargs))

    def _plan(self, kwargs):
        last = feature_layer(self.info.get_hf_config()) if self.records_tower else None
        return common.request_plan(self.info.ctx, kwargs, tower_last=last, family=self.family)


class TokenSieveLlavaProcessor(PlanProcessor, LlavaMultiModalProcessor):
    """vLLM's LLaVA processor with tokensieve's plans."""


VISION_MODEL_MAPPER = WeightsMapper(  # transformers 5.x saves CLIP towers without ``.vision_model.``
    orig_to_new_regex={re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): r"\1vision_tower.vision_model."})


def feature_layer(config) -> int:
    """Index of the CLIP layer whose output the LLM features are (the engine's ``Adapter.feature_layer``)."""
    fl = config.vision_feature_layer
    fl = fl if isinstance(fl, int) else fl[-1]
    return config.vision_config.num_hidden_layers + fl if fl < 0 else fl - 1


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

    hf_to_vllm_mapper = VISION_MODEL_MAPPER | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        common.announce(type(self).__name__)

    def embed_multimodal(self, **kwargs):
        field = kwargs.pop(common.FIELD, None)
        pixels = kwargs.get("pixel_values")
        fl = feature_layer(self.config)
        item_plans = common.item_plans(field, len(pixels) if pixels is not None else 0, fl) if field is not None else []
        wants = tower_wants(item_plans, fl)
        if wants and pixels is not None:
            return self._embed_with_tower(item_plans, wants, **kwargs)
        features = super().embed_multimodal(**kwargs)
        if field is None or len(features) == 0:
            return features
        if all(p is None for p in item_plans):
            return features
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return common.prune(list(features), item_plans, lambda i: grid(side, features[i].shape[0]))

    def _embed_with_tower(self, item_plans: list, wants: dict, **kwargs):
        """Run the tower once with its record hooks on, project, and prune each image with its record."""
        image_input = self._parse_and_validate_image_input(**kwargs)
        tower_out, rec = with_tower_record(self, wants, lambda: self._process_image_pixels(image_input))
        features = self.multi_modal_projector(tower_out)  # tower_out [n, N, D_tower]: the projector's input
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        prefix = int(self.config.vision_feature_select_strategy == "full")
        fl = feature_layer(self.config)

        def signals(i: int, stage) -> dict:  # LLaVA's tower_to_tokens: the "full" strategy's CLS token gets 0
            values = {k: v[i] for k, v in stage_values(rec, stage, fl).items()}
            return {k: torch.cat([v.new_zeros(1, *v.shape[1:]), v]) for k, v in values.items()} if prefix else values

        def tower(i: int):
            return plans.ItemTower(signals=lambda stage: signals(i, stage), features=tower_out[i],
                                   project=self.multi_modal_projector)
        return common.prune(list(features), item_plans, lambda i: grid(side, features[i].shape[0]), tower=tower)


def tower_wants(item_plans: list, feature_layer_: int) -> dict[int, set]:
    """{vision layer: the records ("cls", "keys", ...) the batch's plans read there}; {} if none reads the tower."""
    wants: dict[int, set] = {}
    for plan in item_plans:
        for stage in plan.stages if plan is not None else []:
            for layer in plans.tower_layers(stage, feature_layer_):
                wants.setdefault(layer, set()).update(tower_records(get_pruner(stage.pruner)))
    return wants


def recorder(rec: TowerRecord, layer: int, want: set, attn):
    """A forward hook on a CLIP layer's ``qkv_proj``: its q / k / v [n, H, S, d] into ``rec`` (engine's record)."""
    def hook(module, args, out):
        qkv = out[0] if isinstance(out, tuple) else out  # [n, S, 3 * H * d]
        n, s = qkv.shape[:2]
        q, k, v = (t.reshape(n, s, attn.num_heads_per_partition, attn.head_dim).transpose(1, 2)
                   for t in qkv.chunk(3, dim=-1))
        record_tower(rec, layer, want, q, k, v, attn.scale)
    return hook


def with_tower_record(model, wants: dict, call):
    """(``call()``'s result, the TowerRecord its CLIP tower pass filled): forward hooks on the model's own
    ``qkv_proj`` of the layers in ``wants``, removed when the call ends."""
    rec = TowerRecord(prefix=1)
    layers = model.vision_tower.vision_model.encoder.layers
    hooks = [layers[i].self_attn.qkv_proj.register_forward_hook(recorder(rec, i, want, layers[i].self_attn))
             for i, want in wants.items()]
    try:
        return call(), rec
    finally:
        for h in hooks:
            h.remove()


def stage_values(rec: TowerRecord, stage, feature_layer_: int) -> dict:
    """A stage's tower signals per tower sequence (the engine's ``tower_signals``): {"tower_score": [n, P(, C)],
    "keys": [n, P, d]} over the patches ({} where the stage reads no tower layer)."""
    pruner = get_pruner(stage.pruner)
    layers, needs = plans.tower_layers(stage, feature_layer_), tower_records(pruner)
    out = {}
    if layers and needs - {"keys"}:
        out["tower_score"] = pruner.tower_score(rec, layers)
    if layers and "keys" in needs:
        out["keys"] = rec.keys[layers[-1]][:, rec.prefix:]
    return out

"""Does a plan fit a model? The checks that need the model's adapter (tower depth, feature layer, a CLS
token), run before any work; ``Plan.parse`` / ``Plan.check`` did the model-independent ones."""
from __future__ import annotations

from ..pruners import get_pruner
from .errors import PlanError
from .plan import Plan
from .signals import CLS_FREE, needs_hooked_tower, needs_tower, tower_records


def vision_layer(adapter, stage) -> int:
    """The layer a vision stage acts before (its last step): a progressive stage given none steps up to the
    feature layer."""
    return adapter.feature_layer if stage.layer is None else stage.layer


def tower_layers(adapter, stage, pruner) -> list[int]:
    """Vision layers whose signals a stage reads (none for LLM stages, or families without a CLS tower unless the
    stage reads only records that need no CLS token, e.g. ``tower.received``, and the family hooks its tower)."""
    records = tower_records(pruner)
    cls_free = records <= CLS_FREE and adapter.vision_layers is not None
    if stage.where == "llm" or not records or not (adapter.cls_tower or cls_free):
        return []
    last = vision_layer(adapter, stage) - 1 if stage.where == "vision" else adapter.feature_layer
    return pruner.tower_layers(last, stage.options)


def check_fit(ad, plan: Plan) -> None:
    """Raise PlanError naming the first stage that the model behind adapter ``ad`` cannot run."""
    n_vision = len(ad.vision_layers) if ad.vision_layers is not None else 0
    for i, stage in enumerate(plan.stages):  # before the layer checks: no placement helps such a stage
        if needs_tower(get_pruner(stage.pruner)) and not ad.cls_tower:
            raise PlanError(f"stage {i} ({stage.describe()}): {stage.pruner} needs a vision tower with a CLS "
                            f"token (families: llava, llava_next); '{ad.family}' has none")
        if needs_hooked_tower(get_pruner(stage.pruner)) and ad.vision_layers is None:
            names = ", ".join(sorted(get_pruner(stage.pruner).signals.of("tower", required=True)))
            raise PlanError(f"stage {i} ({stage.describe()}): {stage.pruner} reads the vision tower's attention "
                            f"({names}), which tokensieve records only on the towers it hooks (families: llava, "
                            f"llava_next, llava_onevision); '{ad.family}' is not one of them")
    plan.check(ad.text_config.num_hidden_layers, n_vision, ad.vision_prefix is not None)
    seen_vision = False
    for i, stage in enumerate(plan.stages):
        pruner, where = get_pruner(stage.pruner), f"stage {i} ({stage.describe()})"
        if stage.where == "vision" and ad.feature_prefix:
            raise PlanError(f"{where}: vision-tower stages need the patch-only features "
                            "(vision_feature_select_strategy='default'); this model hands the projector its CLS "
                            "hidden state too ('full'): prune at where=pre_llm or llm")
        if stage.where == "vision" and pruner.progressive and sum(s.where == "vision" for s in plan.stages) > 1:
            raise PlanError(f"{where}: {stage.pruner} prunes step by step through the tower and must be the "
                            "plan's only vision-tower stage")
        if stage.where == "vision" and vision_layer(ad, stage) > ad.feature_layer:
            raise PlanError(f"{where}: the LLM features come from vision layer {ad.feature_layer}; a vision "
                            f"stage must act at layer <= {ad.feature_layer}")
        read = tower_layers(ad, stage, pruner)
        beyond = [x for x in read if x >= n_vision]
        if beyond:  # e.g. prumerge reads the layer after the feature layer
            raise PlanError(f"{where}: {stage.pruner} reads vision layer {beyond[0]}; this tower has {n_vision} layers")
        if seen_vision and len(read) > 1:
            raise PlanError(f"{where}: {stage.pruner} reads every tower layer and cannot follow a vision-tower stage")
        seen_vision |= stage.where == "vision"
        if stage.where == "llm" and len(pruner.llm_steps(stage.layer, stage.options)) > 1 and any(
                s.where == "llm" for s in plan.stages[:i]):
            raise PlanError(f"{where}: {stage.pruner} acts before every LLM layer from 0 to {stage.layer} and must "
                            "be the plan's first LLM stage")

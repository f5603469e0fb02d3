"""Does a plan fit a model? The checks that need the model's adapter (tower depth, feature layer, a CLS
token), run before any work; ``Plan.parse`` / ``Plan.check`` did the model-independent ones."""
from __future__ import annotations

from ..pruners import get_pruner
from .errors import PlanError
from .plan import Plan
from .signals import CLS_FREE, TOWER_RECORDS, needs_hooked_tower, needs_tower, tower_records


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


def family_refusal(adapter_cls, pruner) -> str | None:
    """Why no model of the family behind ``adapter_cls`` can run ``pruner`` at any stage (a signal its tower cannot
    give), or None: it may run (placement and depth are checked per model by ``check_fit``)."""
    if needs_tower(pruner) and not adapter_cls.cls_tower:
        return (f"{pruner.name} needs a vision tower with a CLS token (families: {', '.join(families_with('cls_tower'))});"
                f" '{adapter_cls.family}' has none")
    if needs_hooked_tower(pruner) and not adapter_cls.hooked_tower:
        names = ", ".join(sorted(pruner.signals.of("tower", required=True)))
        return (f"{pruner.name} reads the vision tower's attention ({names}), which tokensieve records only on the "
                f"towers it hooks (families: {', '.join(families_with('hooked_tower'))}); '{adapter_cls.family}' "
                "is not one of them")
    return None


def families_with(capability: str) -> list[str]:
    """The registered families whose adapter class has ``capability`` (``cls_tower``, ``hooked_tower``)."""
    from .adapters import ADAPTERS

    return [f for f, a in ADAPTERS.items() if getattr(a, capability)]


def runs_on(pruner) -> dict[str, str | None]:
    """Every registered family -> None where ``pruner`` may run on it, else the reason it is refused."""
    from .adapters import ADAPTERS

    return {f: family_refusal(a, pruner) for f, a in ADAPTERS.items()}


def surrogates(adapter_cls, pruner) -> list[str]:
    """Tower signals ``pruner`` reads but does not require that the family's tower cannot give: the pruner runs
    with its documented surrogate for them."""
    def given(name):
        record = TOWER_RECORDS.get(name)
        return adapter_cls.cls_tower or (record in CLS_FREE and adapter_cls.hooked_tower)

    return sorted(n for n in pruner.signals.of("tower") if not given(n))


def contiguous_positions(ad, plan: Plan) -> bool:
    """Whether the model behind adapter ``ad`` numbers ``plan``'s pruned LLM sequence 0..L-1 (``Plan.positions``;
    a family that refuses it runs a default contiguous as original)."""
    return plan.positions == "contiguous" and not ad.contiguous_refused


def check_fit(ad, plan: Plan) -> None:
    """Raise PlanError naming the first stage that the model behind adapter ``ad`` cannot run."""
    n_vision = len(ad.vision_layers) if ad.vision_layers is not None else 0
    for i, stage in enumerate(plan.stages):  # before the layer checks: no placement helps such a stage
        reason = family_refusal(type(ad), get_pruner(stage.pruner))
        if reason:
            raise PlanError(f"stage {i} ({stage.describe()}): {reason}")
    plan.check(ad.text_config.num_hidden_layers, n_vision, ad.vision_prefix is not None)
    if plan.positions_given and plan.positions == "contiguous" and ad.contiguous_refused:
        raise PlanError(f"positions=contiguous does not run on '{ad.family}': {ad.contiguous_refused}; "
                        "give positions=original or leave it out")
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

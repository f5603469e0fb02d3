"""Plans: which pruners act where, with what budget.

A plan is an ordered list of stages. A stage names a pruner, where it acts and how many
visual tokens survive it:

    Plan.parse("cls:keep=64")
    Plan.parse("fastv:layer=2,keep=0.25")
    Plan.parse("tome:keep=288;fastv:layer=2,keep=64")
    Plan.parse([{"pruner": "uniform", "keep": 64}, {"pruner": "fastv", "layer": 2, "keep": 32}])
    Plan.parse("plan.yaml")          # a YAML or JSON file holding a list of such dicts

Where a stage acts (``where``):
    "vision"  inside the vision tower, before encoder layer ``layer`` (>= 1); keep counts per image
    "frames"  across the frames of the request's video, before the LLM: ``keep`` is the video's total
              budget, shared out over its frames (QuoTA, KeyScore); the images of the request pass
    "pre_llm" between the tower (after the projector) and the language model
    "llm"     inside the language model, before decoder layer ``layer`` (>= 1)
Each pruner has a default ``where``; giving ``layer`` alone picks "llm" for pruners
that default to it, else "vision"/"llm" must be spelled out with ``where=``.

``keep`` is an int count or a float ratio in (0, 1] of the visual tokens entering the stage, or
"auto": a budget chosen per request by a rule, after which later stages give ratios. Any pruner at a
vision (per image), frames, pre_llm or llm stage takes ``keep=auto,mass=M`` (importance mass; pruners with scores) or
``keep=auto,tau=T`` (redundancy; per frame on a video), with optional bounds ``min=`` / ``max=`` (a count or a
ratio); an adaptive pruner (prumerge) also takes plain ``keep=auto``, its own rule. Rules, formulas and costs:
``engine/budget.py``; the budget each request got: ``Result.stats["budgets"]``.

Default layers, one rule for every pruner: a stage without ``layer`` acts at the pruner's default layer,
the one its paper uses on LLaVA-1.5-7B's 32-layer LLM (FastV 2, SparseVLM 3, FEATHER 8, AIM 15), in every
model; it is never rescaled, so a plan means the same thing on every model. Where the model has no such
layer (FEATHER's 8 in a 4-layer LLM) the plan is refused before any work, with the valid range and the
layer at the paper's depth ratio (8/32 of 4 layers: layer=1).

Positions (``positions=original|contiguous``, on vision, frames and pre_llm stages; an LLM stage takes none:
the sequence is built by then): after pruning before the LLM, ``original`` keeps each kept token's position in
the unpruned prompt; ``contiguous`` numbers each request's kept sequence (text + kept visual tokens) 0..L-1, as
if the pruned prompt had been the input, which is what the official pre-LLM codes do on LLaVA (they prune before
LLaVA's ``prepare_inputs_labels_for_multimodal`` numbers the sequence). Not given: the pruner's
``official_positions``, that of the plan's last stage before the LLM (``Plan.positions``); families that keep
original positions (``Adapter.contiguous_refused``: M-RoPE, Gemma 3's sliding window) refuse an explicit
``contiguous`` and run a default one as ``original``. Stages that give it must agree.

A request with no image and no video runs unpruned whatever its plan (there is nothing to prune); the
plan is still checked against the model.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .budget import AutoBudget, check_after_vision_auto, parse_budget
from .errors import PlanError

WHERES = ("vision", "frames", "pre_llm", "llm")
POSITIONS = ("original", "contiguous")  # the position conventions of a stage before the LLM (module docstring)
_STAGE_KEYS = {"pruner", "where", "layer", "keep", "positions"}


@dataclass(frozen=True)
class Stage:
    pruner: str
    where: str
    keep: int | float
    layer: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    layer_is_default: bool = field(default=False, compare=False)  # no layer was given: the pruner's default
    budget: AutoBudget | None = None  # keep="auto": its rule and bounds (engine/budget.py)
    positions: str | None = None  # "original" / "contiguous" as the plan gives it; None: not given

    def keep_count(self, n_in: int | None) -> int | None:
        """Concrete number of tokens kept out of ``n_in`` entering the stage (None: decided at run time)."""
        if self.keep == "auto" or n_in is None:
            return None
        if isinstance(self.keep, float):
            return max(1, int(round(self.keep * n_in)))
        return int(self.keep)

    def describe(self) -> str:
        at = {"vision": "vision tower up to the feature layer" if self.layer is None else f"vision layer {self.layer}",
              "frames": "across frames", "pre_llm": "before the LLM",
              "llm": f"LLM layer {self.layer}"}
        rule = f" {','.join(self.budget.keys())}" if self.budget is not None and self.budget.keys() else ""
        return f"{self.pruner} ({at[self.where]}, keep={self.keep}{rule})"


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.stages)

    def __str__(self) -> str:
        return ";".join(_stage_to_str(s) for s in self.stages)

    @classmethod
    def parse(cls, spec: "Plan | str | list | None") -> "Plan":
        """Build a plan from a string, a list of dicts, a YAML/JSON path, a Plan, or None (empty)."""
        if spec is None:
            return cls()
        if isinstance(spec, Plan):
            return spec
        if isinstance(spec, str):
            if spec.strip().endswith((".yaml", ".yml", ".json")):
                return cls.parse(_read_plan_file(spec.strip()))
            parts = spec.split(";")
            if spec.strip() and not all(p.strip() for p in parts):
                raise PlanError(f"plan {spec!r} has an empty stage (a stray ';'); stages are 'pruner:key=value,...' "
                                "separated by single ';'")
            items = [_parse_stage_str(part) for part in parts if part.strip()]
        elif isinstance(spec, (list, tuple)):
            items = [dict(item) if isinstance(item, dict) else _bad(f"stage {i} is not a dict: {item!r}")
                     for i, item in enumerate(spec)]
        else:
            raise PlanError(f"cannot build a plan from {type(spec).__name__}: give a string, a list of dicts or a file")
        stages = tuple(_make_stage(i, item) for i, item in enumerate(items))
        for i, s in enumerate(stages[1:], 1):
            if isinstance(s.keep, int) and any(p.keep == "auto" for p in stages[:i]):
                raise PlanError(f"stage {i} ({s.describe()}): after a keep=auto stage, give keep as a ratio")
        check_after_vision_auto(stages)
        given = {s.positions for s in stages if s.positions is not None}
        if len(given) > 1:
            raise PlanError(f"stages give different positions ({' and '.join(sorted(given))}); a request's LLM "
                            "sequence is numbered one way: give positions= once, or the same on each stage")
        return cls(stages)

    @property
    def positions(self) -> str | None:
        """The position convention of the LLM sequence this plan builds: the one its stages give, else the
        ``official_positions`` of the pruner of its last stage before the LLM; None: no such stage."""
        from ..pruners import REGISTRY

        before = [s for s in self.stages if s.where != "llm"]
        given = [s.positions for s in before if s.positions is not None]
        return given[0] if given else (REGISTRY[before[-1].pruner].official_positions if before else None)

    @property
    def positions_given(self) -> bool:
        """Whether a stage of this plan names its positions (else ``positions`` is the pruners' default)."""
        return any(s.positions is not None for s in self.stages)

    def stage_dicts(self) -> list[dict]:
        """The stages as the dicts ``Plan.parse`` takes (what a plan file holds): ``Plan.parse(p.stage_dicts()) == p``."""
        return [_parse_stage_str(part) for part in str(self).split(";") if part]

    def check(self, n_llm_layers: int, n_vision_layers: int, supports_vision_stages: bool) -> None:
        """Raise PlanError for a stage whose layer does not exist in this model (before any work)."""
        order = {"vision": 0, "frames": 1, "pre_llm": 2, "llm": 3}
        last = (-1, -1)
        for i, s in enumerate(self.stages):
            if s.where == "vision":
                if not supports_vision_stages:
                    from ..pruners import get_pruner
                    hint = "; give where=pre_llm" if "pre_llm" in get_pruner(s.pruner).wheres else ""
                    raise PlanError(f"stage {i} ({s.describe()}): this model family has no vision-tower stages{hint}")
                if s.layer is not None and not 1 <= s.layer < n_vision_layers:
                    raise PlanError(_layer_error(i, s, "vision", n_vision_layers))
            if s.where == "llm" and not 1 <= s.layer < n_llm_layers:
                raise PlanError(_layer_error(i, s, "LLM", n_llm_layers))
            pos = (order[s.where], s.layer if s.layer is not None else 0)
            if pos <= last:
                raise PlanError(f"stage {i} ({s.describe()}) must come after the stage before it "
                                "(vision < frames < pre_llm < llm, layers increasing)")
            last = pos

    def keep_counts(self, n_visual: int, n_images: int = 1, n_video: int = 0) -> list[int | None]:
        """Tokens kept by each stage for a request of ``n_visual`` tokens in ``n_images`` images,
        ``n_video`` of them a video's.

        Raises PlanError when a stage keeps <= 0 or more than the tokens entering it.
        Vision stages count per image; a frames stage counts the video's tokens (the images' pass);
        the others per request. None: decided at run time (after an adaptive or a frames stage,
        whose share-out may keep fewer than its budget).
        """
        counts, n_in = [], n_visual
        for i, s in enumerate(self.stages):
            per_image = s.where == "vision"
            if s.where == "frames":
                entering = n_video if n_in is not None else None
            else:
                entering = n_in // max(n_images, 1) if per_image and n_in is not None else n_in
            k = s.keep_count(entering)
            if k is not None and k > entering:
                raise PlanError(f"stage {i} ({s.describe()}): keep={s.keep} is larger than the "
                                f"{entering} visual tokens entering it" + (" per image" if per_image else "")
                                + (" (the video's)" if s.where == "frames" else ""))
            counts.append(k)
            n_in = None if k is None or s.where == "frames" else (k * n_images if per_image else k)
        return counts


def _layer_error(i: int, s: Stage, part: str, n_layers: int) -> str:
    """The refusal of a stage whose layer this model does not have: the valid range, and for a default layer
    the layer at the paper's depth ratio (the module's rule)."""
    from ..pruners.base import DEFAULT_LAYER_DEPTH

    valid = f"[1, {n_layers - 1}]"
    if n_layers < 2:  # a stage acts before a layer after the first: there is none
        return (f"stage {i} ({s.describe()}): this model's {part} has {n_layers} layer, and a stage there acts "
                "before a layer after the first: it needs at least 2 layers")
    if not s.layer_is_default:
        return f"stage {i} ({s.describe()}): {part} layer must be in {valid}"
    scaled = min(max(1, round(s.layer * n_layers / DEFAULT_LAYER_DEPTH)), n_layers - 1)
    return (f"stage {i} ({s.describe()}): {s.pruner}'s default layer {s.layer} (its paper's, in a "
            f"{DEFAULT_LAYER_DEPTH}-layer LLM) is not in this model's {n_layers}-layer {part}; give layer= in "
            f"{valid}, e.g. layer={scaled} (the same depth ratio)")


def _bad(msg: str):
    raise PlanError(msg)


def _read_plan_file(path: str) -> list:
    if not os.path.isfile(path):
        raise PlanError(f"plan file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise PlanError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PlanError(f"{path}: cannot read the plan file ({e.strerror})") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise PlanError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    else:
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise PlanError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or e}{where})") from None
    if isinstance(data, dict) and "stages" in data:
        data = data["stages"]
    if not isinstance(data, list):
        raise PlanError(f"{path}: expected a list of stages (or a dict with 'stages')")
    return data


def _parse_value(text: str) -> Any:
    text = text.strip()
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    parts = text.split("/")
    if len(parts) > 1 and all(isinstance(_parse_value(t), (int, float)) for t in parts):  # e.g. layers=8/16
        return [_parse_value(t) for t in parts]
    return text  # a path such as scorer=/ckpt/tiny stays a string


def _parse_stage_str(part: str) -> dict:
    name, _, rest = part.strip().partition(":")
    item: dict[str, Any] = {"pruner": name.strip()}
    for kv in filter(None, (x.strip() for x in rest.split(","))):
        if "=" not in kv:
            raise PlanError(f"stage '{part.strip()}': option '{kv}' is not key=value")
        k, v = kv.split("=", 1)
        if k.strip() in item:
            raise PlanError(f"stage '{part.strip()}': option '{k.strip()}' is given twice")
        item[k.strip()] = _parse_value(v)
    return item


def _make_stage(i: int, item: dict) -> Stage:
    from ..pruners import get_pruner  # registry: validates the name

    name = item.get("pruner")
    if not name:
        raise PlanError(f"stage {i}: no pruner named")
    pruner = get_pruner(name, stage_label=f"stage {i}")
    keep = item.get("keep", pruner.default_keep)
    if keep is None:
        raise PlanError(f"stage {i} ({name}): keep is required")
    if keep == "auto":
        pass  # its rule and bounds: parse_budget, below
    elif isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep):
        raise PlanError(f"stage {i} ({name}): keep must be an int count or a ratio in (0, 1], got {keep!r}")
    elif keep <= 0:
        raise PlanError(f"stage {i} ({name}): keep must be > 0, got {keep}")
    elif isinstance(keep, float) and keep > 1:
        raise PlanError(f"stage {i} ({name}): a ratio keep must be in (0, 1], got {keep}")
    layer = item.get("layer")
    where = item.get("where") or pruner.default_where
    if where not in WHERES:
        raise PlanError(f"stage {i} ({name}): where must be one of {WHERES}, got {where!r}")
    if where not in pruner.wheres:
        raise PlanError(f"stage {i} ({name}): {name} cannot act at '{where}' (it acts at {', '.join(pruner.wheres)})")
    item = dict(item)
    budget = parse_budget(item, pruner, keep, where, f"stage {i} ({name})")
    layer_is_default = where in ("vision", "llm") and layer is None and pruner.default_layer is not None
    if where in ("vision", "llm"):
        layer = pruner.default_layer if layer is None else layer
        if layer is None and where == "vision" and pruner.progressive:
            pass  # steps up to the tower's feature layer, resolved by the engine
        elif not isinstance(layer, int) or isinstance(layer, bool):
            raise PlanError(f"stage {i} ({name}): layer must be an int, got {layer!r}")
    elif layer is not None:
        raise PlanError(f"stage {i} ({name}): a '{where}' stage takes no layer")
    positions = _positions(i, name, where, item.get("positions"))
    options = {k: v for k, v in item.items() if k not in _STAGE_KEYS}
    unknown = set(options) - set(pruner.option_names)
    if unknown:
        raise PlanError(f"stage {i} ({name}): unknown option(s) {sorted(unknown)}; "
                        f"{name} takes {sorted(pruner.option_names) or 'none'} (tokensieve pruners lists them)")
    options = {k: pruner.options[k].validate(v, f"stage {i} ({name}): {k}") for k, v in options.items()}
    return Stage(pruner=name, where=where, keep=keep, layer=layer, options=options, layer_is_default=layer_is_default,
                 budget=budget, positions=positions)


def _positions(i: int, name: str, where: str, value) -> str | None:
    """A stage's ``positions=`` value, checked: one of POSITIONS, and only on a stage before the LLM."""
    if value is None:
        return None
    if where == "llm":
        raise PlanError(f"stage {i} ({name}): positions= applies to stages that prune before the LLM sequence is "
                        "built (vision, frames, pre_llm); an LLM stage keeps the positions its tokens entered with")
    if value not in POSITIONS:
        raise PlanError(f"stage {i} ({name}): positions must be one of {', '.join(POSITIONS)}, got {value!r}")
    return value


def _stage_to_str(s: Stage) -> str:
    parts = [f"where={s.where}"] + ([f"layer={s.layer}"] if s.layer is not None else []) + [f"keep={s.keep}"]
    if s.budget is not None:  # a key the pruner also has as an option is written budget_<key> (engine/budget.py)
        from ..pruners import REGISTRY
        parts += [f"budget_{kv}" if kv.split("=")[0] in REGISTRY[s.pruner].options else kv for kv in s.budget.keys()]
    parts += [f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in s.options.items()]
    parts += [f"positions={s.positions}"] if s.positions is not None else []
    return f"{s.pruner}:{','.join(parts)}"


def default_place(pruner: str, keep, llm_layer: int | None = None) -> str:
    """One pruner at the place it acts by default, as a plan string: ``"divprune:keep=0.25"``; an LLM-stage
    pruner before ``llm_layer`` (None: its own default layer), ``"fastv:layer=2,keep=0.25"``."""
    from ..pruners import REGISTRY

    if pruner not in REGISTRY:
        raise PlanError(f"unknown pruner '{pruner}'; known: {', '.join(sorted(REGISTRY))}")
    at_llm = REGISTRY[pruner].default_where == "llm" and llm_layer is not None
    return f"{pruner}:" + (f"layer={llm_layer}," if at_llm else "") + f"keep={keep}"

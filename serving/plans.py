"""A request's plan inside vLLM: parse it with tokensieve's own parser, refuse what vLLM cannot run, count the
kept tokens before the encoder runs, and run the pruner's selection on the projected features.

Pure functions on tensors; nothing here imports vLLM (the vLLM glue: ``vllm_plugin``, ``vllm_models``).

What runs in vLLM: ``pre_llm`` stages, the same ``Pruner.select`` the engine calls, on each multimodal item (an
image, a video) by itself:

- the pruners that read no signal besides the visual tokens (``RUNS_IN_VLLM``: random, uniform, pool,
  divprune, dycoke, vidcom2), on every family;
- the pruners that read the vision tower (``TOWER_SIGNALS``: CLS attention, keys, values, q / k, the
  projector's input), where the model records its tower (LLaVA-1.5: ``vllm_llava``, up to its feature layer,
  the last layer vLLM builds); elsewhere those whose tower reads are optional, with the pruner's documented
  surrogate, as the engine runs them on a family without a CLS tower (``RUNS_WITH_SURROGATE``).

What is refused, and why (``refusal``):

- LLM stages (fastv, sparsevlm, ...): they drop tokens inside the language model, which would change vLLM's
  paged KV cache mid-prefill: out of reach for a plugin;
- vision-tower and frames stages: vLLM runs its own tower whole, and has no frame-scoring pass;
- pruners that read other signals (the question's embeddings, a request's priority, ...): vLLM records none;
  pruners that need a tower layer past the feature layer (PruMerge): vLLM does not build it;
- ``keep=auto``: vLLM fixes the number of placeholder tokens before the encoder runs, so the count must follow
  from the plan and the item's token count alone.
- a ``positions=`` that is not the one vLLM gives the family (``VLLM_POSITIONS``, ``check_positions``): vLLM
  numbers a pruned LLaVA prompt's tokens contiguously and keeps Qwen's original 3-D M-RoPE positions. A plan
  that names none gets the same in tokensieve's engine (each pruner's ``official_positions`` is contiguous; the
  M-RoPE families run it as original), so both paths agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..engine.errors import PlanError
from ..engine.plan import Plan
from ..engine.signals import tower_records
from ..pruners import REGISTRY, Selection, StageInput, get_pruner

PLAN_KEY = "plan"  # the mm_processor_kwargs key
MAX_PLAN_BYTES = 512  # a plan travels to the encoder as this many UTF-8 bytes (``encode``)


class PlanRefused(ValueError):
    """A request's plan that tokensieve's vLLM plugin cannot run (a ValueError: vLLM answers it with a 400)."""

    def __init__(self, reason: str):
        super().__init__(f"tokensieve: {reason}")


TOWER_SIGNALS = frozenset({"tower.cls", "tower.keys", "tower.values", "tower.qk", "tower.received",
                           "tower.features", "tower.patches"})  # what a model that records its tower gives


def runs_in_vllm(name: str, tower: bool = False) -> str | None:
    """None if pruner ``name`` can run in vLLM (a pre_llm stage reading only the tokens, or tower signals: the
    model's record where ``tower``, else the pruner's surrogate where the tower read is optional), else why not."""
    cls = REGISTRY[name]
    if "pre_llm" not in cls.wheres:
        return (f"{name} prunes inside the language model ({'/'.join(cls.wheres)}), which would change vLLM's "
                "paged KV cache in the middle of the model; only pre-LLM pruners run in vLLM")
    other = cls.signals.reads - TOWER_SIGNALS
    if other:
        return (f"{name} reads {', '.join(sorted(other))}, which vLLM does not record; pruners that read only the "
                f"visual tokens run in vLLM: {', '.join(RUNS_IN_VLLM)} (and, on LLaVA-1.5 and LLaVA-NeXT, the vision "
                f"tower's signals: {', '.join(RUNS_WITH_TOWER)})")
    required = cls.signals.of("tower", required=True)
    if required and not tower:
        return (f"{name} needs {', '.join(sorted(required))} of a vision tower with a CLS token, which the plugin "
                "records in vLLM on LLaVA-1.5 and LLaVA-NeXT only")
    return None


def _pre_llm(reads) -> tuple:
    return tuple(n for n, c in REGISTRY.items() if "pre_llm" in c.wheres and reads(c.signals))


RUNS_IN_VLLM = _pre_llm(lambda s: not s.reads)
RUNS_WITH_TOWER = _pre_llm(lambda s: s.reads and s.reads <= TOWER_SIGNALS)
RUNS_WITH_SURROGATE = _pre_llm(lambda s: s.reads and s.reads <= TOWER_SIGNALS and not s.of("tower", required=True))
VLLM_POSITIONS = {"llava": "contiguous", "llava_next": "contiguous", "llava_onevision": "contiguous",
                  "qwen2_vl": "original", "qwen2_5_vl": "original", "qwen3_vl": "original"}  # tokensieve family ->
# how vLLM numbers a pruned prompt: LLaVA-style placeholders are shrunk, so the kept tokens are numbered 0..L-1;
# Qwen's kept tokens keep their (t, h, w) M-RoPE positions (``recompute_mrope_positions``; docs/serving.md)


def check_positions(plan: Plan, family: str) -> None:
    """Refuse (PlanRefused) a plan whose ``positions=`` is not the convention vLLM gives ``family``'s pruned prompts."""
    runs = VLLM_POSITIONS.get(family)
    if runs is not None and plan.positions_given and plan.positions != runs:
        raise PlanRefused(f"plan '{plan}' asks for positions={plan.positions}, but vLLM numbers a pruned {family} "
                          f"prompt's tokens {'contiguously' if runs == 'contiguous' else 'at their original positions'}"
                          f" (positions={runs}); give positions={runs} or leave it out")


def parse(value, tower_last: int | None = None, family: str | None = None) -> Plan | None:
    """A request's ``plan`` value -> a Plan vLLM can run, or None (no plan: stock vLLM). ``tower_last``: the
    model records its vision tower up to this layer, its feature layer (None: it records none); ``family``: the
    tokensieve family of the served model.

    Raises PlanRefused naming the reason: not a string, empty, malformed (tokensieve's parser's message),
    an unknown pruner, a stage vLLM cannot run (``runs_in_vllm``, a tower layer past ``tower_last``),
    keep=auto, too long to carry, or (``family`` given) a ``positions=`` vLLM does not give it
    (``check_positions``)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise PlanRefused(f"'{PLAN_KEY}' must be a plan string such as 'divprune:keep=0.25', got "
                          f"{type(value).__name__} {value!r}")
    if not value.strip():
        raise PlanRefused(f"'{PLAN_KEY}' is empty; give a plan such as 'divprune:keep=0.25', or leave the key out")
    if len(value.encode()) > MAX_PLAN_BYTES:
        raise PlanRefused(f"the plan is longer than {MAX_PLAN_BYTES} bytes")
    if value.strip().endswith((".yaml", ".yml", ".json")):
        raise PlanRefused("plan files are not read in a server request; give the plan string")
    try:
        plan = Plan.parse(value)
    except PlanError as e:
        raise PlanRefused(f"bad plan {value!r}: {e}") from None
    for i, s in enumerate(plan.stages):
        why = runs_in_vllm(s.pruner, tower=tower_last is not None)
        if why is None and tower_last is not None:
            why = _past_the_tower(s, tower_last)
        if why is None and s.where != "pre_llm":
            why = (f"a '{s.where}' stage acts inside vLLM's vision tower or frame sampling, which the plugin "
                   "does not reach; give where=pre_llm")
        if why is None and s.keep == "auto":
            why = "keep=auto decides the count from the features, but vLLM fixes it before the encoder runs"
        if why is not None:
            raise PlanRefused(f"plan {value!r}, stage {i} ({s.describe()}): {why}")
    if family is not None:
        check_positions(plan, family)
    return plan


def tower_layers(stage, feature_layer: int) -> list[int]:
    """The vision layers a pre_llm stage reads (the engine's ``fit.tower_layers`` on a CLS tower), [] for a
    pruner that records nothing there."""
    pruner = get_pruner(stage.pruner)
    return pruner.tower_layers(feature_layer, stage.options) if tower_records(pruner) else []


def _past_the_tower(stage, last: int) -> str | None:
    try:
        layers = tower_layers(stage, last)
    except PlanError as e:
        return str(e)
    if layers and max(layers) > last:
        return (f"{stage.pruner} reads vision layer {max(layers)}, past the feature layer {last}, the last layer "
                "vLLM builds of this tower")
    return None


def kept_count(plan: Plan, n_tokens: int) -> int:
    """Visual tokens an item of ``n_tokens`` keeps under ``plan`` (PlanRefused when a stage keeps more than
    enter it, e.g. keep=200 of a 64-token image)."""
    try:
        counts = plan.keep_counts(n_tokens, 1, 0)
    except PlanError as e:
        raise PlanRefused(f"plan '{plan}' on an item of {n_tokens} visual tokens: {e}") from None
    return counts[-1] if counts else n_tokens


def encode(plan: str | None) -> torch.Tensor:
    """A plan string -> [MAX_PLAN_BYTES] uint8 (UTF-8, zero padded; all zeros: no plan), the per-item field
    that carries it from vLLM's processor to the model's encoder."""
    out = torch.zeros(MAX_PLAN_BYTES, dtype=torch.uint8)
    data = (plan or "").encode()
    out[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return out


def decode(field: torch.Tensor) -> str | None:
    """``encode``'s inverse: [MAX_PLAN_BYTES] uint8 -> the plan string, or None for no plan."""
    data = bytes(field.to(torch.uint8).tolist()).rstrip(b"\0")
    return data.decode() if data else None


@dataclass
class ItemTower:
    """One item's vision-tower record, as a model that records its tower gives it to ``select``.

    ``signals(stage)`` -> the stage's {"tower_score": [N] (or [N, C]), "keys": [N, d]} on the item's N original
    tokens ({} where the stage reads none); ``features`` [N, D_tower]: the projector's input of those tokens;
    ``project``: [k, D_tower] -> [k, D], the model's projector (for tokens merged before it)."""

    signals: Callable
    features: torch.Tensor | None = None
    project: Callable | None = None


def select(plan: Plan, tokens: torch.Tensor, coords: torch.Tensor, frames: torch.Tensor | None = None,
           seed: int = 0, tower: ItemTower | None = None,
           extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the plan's stages on one item's projected features, as the engine's pre_llm stages do.

    tokens [N, D], coords [N, 3] (item, row, col), frames [N] (a video's frame of each token) or None,
    ``tower``: the item's tower record (None: pruners that read the tower use their surrogates) ->
    (kept [k] sorted original indices, features [k, D] in original order: rows of ``tokens``, or the merged
    tokens of a merging pruner such as pool; a pruner that reads ``tower.features`` merges the projector's
    input and the merged rows are projected, as the engine does).

    ``extra`` [N, E] (e.g. Qwen3-VL's DeepStack channels): carried along, never read by the pruners; the
    features come back as [k, D + E], each kept token's extra channels its own row, or for a merged token
    the mean over the original tokens it stands for (as the engine's ``deepstack.group_mean``).
    """
    alive = torch.arange(tokens.shape[0])
    sizes = torch.ones(tokens.shape[0])
    before = tower.features if tower is not None else None  # the projector's input of the alive tokens
    for stage, keep in zip(plan.stages, plan.keep_counts(tokens.shape[0], 1, 0)):
        pruner = get_pruner(stage.pruner)
        signals = {k: v[alive.to(v.device)] for k, v in (tower.signals(stage) if tower else {}).items()}
        if before is not None and "tower.patches" in pruner.signals.reads:
            signals["patches"] = before
        merges_before = before is not None and "tower.features" in pruner.signals.reads
        sel = pruner.select(StageInput(tokens=before if merges_before else tokens, keep=keep, coords=coords,
                                       options=stage.options, seed=seed, sizes=sizes, frames=frames, **signals))
        _check(sel, tokens.shape[0], keep, stage.describe())
        idx = sel.keep_idx.to(alive.device)
        if sel.groups is not None:
            extra = None if extra is None else _group_mean(extra, sizes, sel.groups, idx.numel())
            sizes = torch.zeros(idx.numel()).index_add_(0, sel.groups.clamp(min=0).cpu(),
                                                        sizes * (sel.groups >= 0).cpu().float())
        else:
            sizes = sizes[idx]
            extra = None if extra is None else extra[sel.keep_idx]
        if sel.tokens is None:
            tokens = tokens[sel.keep_idx]
        elif merges_before:
            tokens = tower.project(sel.tokens.to(before.dtype)).to(tokens.dtype)
        else:
            tokens = sel.tokens.to(tokens.dtype)
        if before is not None:  # follows the tokens (the engine's follow_tower_feats)
            before = before[sel.keep_idx] if sel.tokens is None else (sel.tokens if merges_before else None)
        alive, coords = alive[idx], coords[idx]
        frames = frames[idx] if frames is not None else None
    return alive, tokens if extra is None else torch.cat([tokens, extra.to(tokens.dtype)], dim=1)


def _group_mean(extra: torch.Tensor, sizes: torch.Tensor, groups: torch.Tensor, k: int) -> torch.Tensor:
    """extra [N, E] of tokens standing for ``sizes`` [N] originals each, merged into ``groups`` [N] (-1: dropped)
    -> [k, E]: per merged token, the mean over all the originals it now stands for."""
    live = (groups >= 0).to(extra.device)
    g = groups.clamp(min=0).to(extra.device)
    w = (sizes.to(extra.device, extra.dtype) * live)[:, None]
    total = extra.new_zeros(k, extra.shape[1]).index_add_(0, g, extra * w)
    count = extra.new_zeros(k).index_add_(0, g, w[:, 0])
    return total / count.clamp(min=1e-12)[:, None]


def _check(sel: Selection, n: int, keep: int, label: str) -> None:
    idx = sel.keep_idx
    if idx.numel() != keep or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
        raise RuntimeError(f"tokensieve: {label}: the pruner returned {idx.numel()} indices (want {keep}, sorted)")
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= n):
        raise RuntimeError(f"tokensieve: {label}: the pruner returned an index outside [0, {n})")

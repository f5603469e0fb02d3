"""A request's plan inside vLLM: parse it with tokensieve's own parser, refuse what vLLM cannot run, count the
kept tokens before the encoder runs, and run the pruner's selection on the projected features.

Pure functions on tensors; nothing here imports vLLM (the vLLM glue: ``vllm_plugin``, ``vllm_models``).

What runs in vLLM: ``pre_llm`` stages of the pruners that read no signal besides the visual tokens themselves
(``RUNS_IN_VLLM``: random, uniform, pool, divprune, dycoke, vidcom2), the same ``Pruner.select`` the engine
calls, on each multimodal item (an image, a video) by itself. What is refused, and why (``refusal``):

- LLM stages (fastv, sparsevlm, ...): they drop tokens inside the language model, which would change vLLM's
  paged KV cache mid-prefill: out of reach for a plugin;
- vision-tower and frames stages: vLLM runs its own tower whole, and has no frame-scoring pass;
- pruners that read signals (CLS attention, tower keys, the question's embeddings, ...): vLLM records none;
- ``keep=auto``: vLLM fixes the number of placeholder tokens before the encoder runs, so the count must follow
  from the plan and the item's token count alone.
"""
from __future__ import annotations

import torch

from ..engine.errors import PlanError
from ..engine.plan import Plan
from ..pruners import REGISTRY, Selection, StageInput, get_pruner

PLAN_KEY = "plan"  # the mm_processor_kwargs key
MAX_PLAN_BYTES = 512  # a plan travels to the encoder as this many UTF-8 bytes (``encode``)


class PlanRefused(ValueError):
    """A request's plan that tokensieve's vLLM plugin cannot run (a ValueError: vLLM answers it with a 400)."""

    def __init__(self, reason: str):
        super().__init__(f"tokensieve: {reason}")


def runs_in_vllm(name: str) -> str | None:
    """None if pruner ``name`` can run in vLLM (a pre_llm stage reading only the tokens), else why not."""
    cls = REGISTRY[name]
    if "pre_llm" not in cls.wheres:
        return (f"{name} prunes inside the language model ({'/'.join(cls.wheres)}), which would change vLLM's "
                "paged KV cache in the middle of the model; only pre-LLM pruners run in vLLM")
    if cls.signals.reads:
        return (f"{name} reads {', '.join(sorted(cls.signals.reads))}, which vLLM does not record; pruners that "
                f"read only the visual tokens run in vLLM: {', '.join(RUNS_IN_VLLM)}")
    return None


RUNS_IN_VLLM = tuple(n for n, c in REGISTRY.items() if "pre_llm" in c.wheres and not c.signals.reads)


def parse(value) -> Plan | None:
    """A request's ``plan`` value -> a Plan vLLM can run, or None (no plan: stock vLLM).

    Raises PlanRefused naming the reason: not a string, empty, malformed (tokensieve's parser's message),
    an unknown pruner, a stage vLLM cannot run (``runs_in_vllm``), keep=auto, or too long to carry."""
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
        why = runs_in_vllm(s.pruner)
        if why is None and s.where != "pre_llm":
            why = (f"a '{s.where}' stage acts inside vLLM's vision tower or frame sampling, which the plugin "
                   "does not reach; give where=pre_llm")
        if why is None and s.keep == "auto":
            why = "keep=auto decides the count from the features, but vLLM fixes it before the encoder runs"
        if why is not None:
            raise PlanRefused(f"plan {value!r}, stage {i} ({s.describe()}): {why}")
    return plan


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


def select(plan: Plan, tokens: torch.Tensor, coords: torch.Tensor, frames: torch.Tensor | None = None,
           seed: int = 0, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the plan's stages on one item's projected features, as the engine's pre_llm stages do.

    tokens [N, D], coords [N, 3] (item, row, col), frames [N] (a video's frame of each token) or None ->
    (kept [k] sorted original indices, features [k, D] in original order: rows of ``tokens``, or the merged
    tokens of a merging pruner such as pool).

    ``extra`` [N, E] (e.g. Qwen3-VL's DeepStack channels): carried along, never read by the pruners; the
    features come back as [k, D + E], each kept token's extra channels its own row, or for a merged token
    the mean over the original tokens it stands for (as the engine's ``deepstack.group_mean``).
    """
    alive = torch.arange(tokens.shape[0])
    sizes = torch.ones(tokens.shape[0])
    for stage, keep in zip(plan.stages, plan.keep_counts(tokens.shape[0], 1, 0)):
        sel = get_pruner(stage.pruner).select(StageInput(
            tokens=tokens, keep=keep, coords=coords, options=stage.options, seed=seed, sizes=sizes, frames=frames))
        _check(sel, tokens.shape[0], keep, stage.describe())
        idx = sel.keep_idx.to(alive.device)
        if sel.groups is not None:
            extra = None if extra is None else _group_mean(extra, sizes, sel.groups, idx.numel())
            sizes = torch.zeros(idx.numel()).index_add_(0, sel.groups.clamp(min=0).cpu(),
                                                        sizes * (sel.groups >= 0).cpu().float())
        else:
            sizes = sizes[idx]
            extra = None if extra is None else extra[sel.keep_idx]
        tokens = tokens[sel.keep_idx] if sel.tokens is None else sel.tokens.to(tokens.dtype)
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

"""The family-independent vLLM glue: the plan of a request in the processor, the shrunk placeholders, the
plan field that carries it to the encoder, and the pruning of each item's features.

Imported only inside vLLM's processes (by the model classes ``vllm_plugin`` registers).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable, Mapping, Sequence

import torch

from . import plans

logger = logging.getLogger("vllm.tokensieve")  # under vLLM's logger: its handlers and level
FIELD = "tokensieve_plan"  # the per-item processor output that carries the plan ([MAX_PLAN_BYTES] uint8)
KEPT_LOG = "TOKENSIEVE_VLLM_KEPT_LOG"  # env: a file each pruned item appends one JSON line to (tests, debugging)


def announce(model: str) -> None:
    """One INFO line when vLLM builds one of tokensieve's models: the plugin is active, and what runs."""
    logger.info("tokensieve: %s serves per-request plans (mm_processor_kwargs={'plan': ...}); pruners that run in "
                "vLLM: %s; with the tower's signals on LLaVA-1.5 (elsewhere their surrogates, where they have one): "
                "%s", model, ", ".join(plans.RUNS_IN_VLLM), ", ".join(plans.RUNS_WITH_TOWER))


def request_plan(ctx, kwargs: Mapping[str, object], tower_last: int | None = None, family: str | None = None):
    """The request's plan (its mm_processor_kwargs merged over the server's ``--mm-processor-kwargs``), parsed
    and checked (``tower_last``: the model records its tower up to that layer; ``family``: the served model's
    tokensieve family, whose position convention in vLLM the plan must not contradict): a Plan, None (no plan),
    or PlanRefused."""
    merged = ctx.get_merged_mm_kwargs(kwargs)
    return plans.parse(merged.get(plans.PLAN_KEY), tower_last, family)


def without_plan(kwargs: Mapping[str, object]) -> dict:
    """The kwargs for the Hugging Face processor: the ``plan`` key is tokensieve's, not the processor's."""
    return {k: v for k, v in kwargs.items() if k != plans.PLAN_KEY}


def plan_field(plan, n_items: int) -> torch.Tensor:
    """[n_items, MAX_PLAN_BYTES] uint8: the plan (all zeros: none) for each item of the request."""
    return plans.encode(None if plan is None else str(plan))[None].repeat(n_items, 1)


def shrink(updates: Sequence, plan) -> list:
    """Each PromptReplacement's placeholder run cut to the plan's kept count for that item (the first
    ``kept_count`` tokens of the stock run: one placeholder id repeated). No plan: the updates as they are."""
    if plan is None:
        return list(updates)

    def shrunk(update):
        stock = update.replacement

        def replacement(item_idx: int):
            seq = stock(item_idx) if callable(stock) else stock
            full = getattr(seq, "full", seq)
            if len(set(full)) != 1:
                raise plans.PlanRefused("this model's placeholder run mixes token ids; it cannot be pruned here")
            return full[:plans.kept_count(plan, len(full))]
        return dataclasses.replace(update, replacement=replacement)

    return [shrunk(u) for u in updates]


def item_plans(field, n_items: int, tower_last: int | None = None) -> list:
    """The plan of each item from the batched field ([n, MAX_PLAN_BYTES] or a list of [MAX_PLAN_BYTES]);
    None (absent field or no plan) per item. ``tower_last``: as the processor's ``request_plan`` had it."""
    if field is None:
        return [None] * n_items
    rows = list(field) if not isinstance(field, torch.Tensor) or field.dim() == 2 else [field]
    return [None if (text := plans.decode(r)) is None else plans.parse(text, tower_last) for r in rows]


def prune(features: Sequence[torch.Tensor], item_plans_: list, coords: Callable[[int], torch.Tensor],
          frames: Callable[[int], torch.Tensor | None] = lambda i: None, with_index: bool = False,
          tower: Callable[[int], plans.ItemTower | None] = lambda i: None, main: int | None = None) -> list:
    """Each item's features [N_i, D] -> its kept rows [k_i, D] in original order (no plan: as they are).
    ``coords(i)`` [N_i, 3] and ``frames(i)`` [N_i] or None describe item i's tokens as the engine's adapter does;
    ``tower(i)``: item i's tower record (``plans.ItemTower``) or None. ``with_index``: (rows, kept original
    indices [k_i]) per item. ``main``: the plan reads only the first ``main`` channels (the LLM's visual
    tokens), the rest ride along (``plans.select``'s ``extra``)."""
    out = []
    for i, (feats, plan) in enumerate(zip(features, item_plans_)):
        if plan is None:
            kept, tokens = torch.arange(feats.shape[0]), feats
        else:
            d = feats.shape[1] if main is None else main
            extra = feats[:, d:] if d < feats.shape[1] else None
            kept, tokens = plans.select(plan, feats[:, :d], coords(i).to(feats.device), frames(i), tower=tower(i),
                                        extra=extra)
            logger.debug("tokensieve: %s kept %d of %d visual tokens", plan, kept.numel(), feats.shape[0])
            _log_kept(plan, feats.shape[0], kept)
        out.append((tokens, kept) if with_index else tokens)
    return out


def _log_kept(plan, n: int, kept: torch.Tensor) -> None:
    path = os.environ.get(KEPT_LOG)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"plan": str(plan), "n": n, "kept": kept.tolist()}) + "\n")

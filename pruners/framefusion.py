"""`framefusion`: FrameFusion (Fu et al., 2025, "FrameFusion: Combining Similarity and Importance for Video
Token Reduction on Large Visual Language Models").

Official code: thu-nics/FrameFusion ``framefusion/main.py::FrameFusion.forward`` (with
``compute_similarity_and_token_index_by_patch``, ``merge_tokens_and_get_mask``, ``_compute_pruning_ratio``),
called by ``framefusion/models/qwen2/modeling_qwen2.py::Qwen2DecoderLayer_merge_then_prune_by_cost_forward``
once before decoder layer 0's attention (on the LLM's input embeddings) and after every layer's attention
(before its MLP); the importance row comes from ``Qwen2SdpaAttention_merge_then_prune_by_cost_forward`` via
``framefusion/utils.py::scaled_dot_product_attention(num=1)``. Defaults ``apply_framefusion(cost=0.3,
similarity_lower_bound=0.6, ratio_lower_bound=0.1)``. What it does, per call, while merging is not finished:

1. *position groups*: every video token has a patch type, its position within its frame (``patch_type =
   range(patch_num) * n_frames``); tokens are ordered by patch type, then sequence order, and each is compared
   (cosine of the hidden states, ``dot / (|a| |b|)``) with the one before it in that order, i.e. the token at the
   same position in the previous frame still alive; the first of each group gets -2;
2. *cap*: the share of compute still allowed, ``_compute_pruning_ratio(sparsity_list, cost, num_layers=28)``:
   with s_i the merged shares of the steps so far, ``1 - (L cost - sum_i prod_{j<=i} (1 - s_j)) /
   ((L - len) prod (1 - s_j))`` (0 when that is negative; ``ValueError("The cost is too small")`` when the
   budget is already spent);
3. the tokens with similarity >= 0.6 are merged; their share s of the video tokens is appended to the list,
   and merging finishes when s < 0.1. If s reaches the cap instead, the ``int(cap * n)`` most similar are
   merged and the method ends there (no prune);
4. *merge*: each run of consecutive merged tokens in that order joins the token before the run (the run's
   first frame): its state becomes the plain mean of that token's current state and the run's (no size
   weighting across steps), at the first frame's place; the run's tokens are removed.
Then, at the next layer's attention after merging finished, the *prune*: the last prompt token's softmax row
of that layer, averaged over heads, ranks the video tokens, and the ``round(n (1 - ratio))`` top ones stay,
the ratio being ``_compute_pruning_ratio`` of the final list.

Mapping onto tokensieve: one LLM stage, several steps (``Pruner.llm_steps``): before decoder layers 0, 1,
.., K (the stage's ``layer``). The official call after layer l's attention is the step before layer l + 1
here (the engine acts between decoder layers), and the prune reads layer l's last-query row (``llm.last_query``,
the fused kernel's row: the same softmax the official eager ``num=1`` row computes). So: step 0 = the official
pre-attention call on the input embeddings (identical); step l + 1 merges the output of layer l where the
official merges layer l's post-attention state, so layer l's MLP runs on the unmerged tokens here and the
similarity is read after it. A run carries its history (``carry``: the list of merged shares, whether merging /
pruning finished) from step to step, per request. The prune happens at the step after merging finished, or
at step K at the latest: a merge the official code would still take there is taken, then the prune follows
at once on the surviving tokens' row entries of layer K - 1 (the official would prune one layer later).

``keep``: ``auto`` (the default) is the official budget, option ``cost`` (share of compute, 0.3), and keeps
what the official code keeps. A count or ratio ``keep`` K instead makes the budget a token count: merges never
go below K (the cap is n - K tokens), the prune keeps exactly K, and the stage ends with K tokens.
``num_layers``: the official hard-codes 28 (the depth of every model it supports at 7B); here the LLM's own
depth. Tokens outside the video's frames (still images) take no part and stay; without a video each item
(image, tile) is a frame. OneVision's newline after the last frame is a position of its own (never merged;
counted among the video tokens). Differences: float32 similarity (the official: model dtype); ties in the
capped top-k go to the lower position (the official ``topk`` leaves them open), and the cap never reaches the
-2 entries (the official would then merge across positions: only for cost < 1 / frames).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Pruner, Selection, Signals, StageInput
from .options import Option

FIRST = -2.0  # the official IGNORE_TOKEN / group-boundary similarity


@dataclass
class History:
    """A request's FrameFusion state between steps (the official ``sparsity_list``, ``finish_*``)."""

    shares: list = field(default_factory=list)
    merged: bool = False  # merging finished
    pruned: bool = False  # pruning finished (the method is done)


def compute_share(shares: list, cost: float, layers: int) -> float:
    """The pruning ratio that keeps the total compute at ``cost`` after the merge steps' ``shares``."""
    s, spent = 1.0, 0.0
    for r in shares:
        s *= 1 - r
        spent += s
    left = layers * cost - spent
    if left < 0:
        raise ValueError(f"framefusion: cost={cost} is too small: the merge steps already spent {spent:.3f} of "
                         f"{layers} layers' compute (give a larger cost or a keep count)")
    if layers <= len(shares):  # a merge step before every layer: no layer left to prune for
        return 0.0
    ratio = left / ((layers - len(shares)) * s)
    return 0.0 if ratio > 1 else 1 - ratio


def position_order(coords: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """coords [N, 3], members [n] video tokens in sequence order -> [n] members ordered by (row, col), then
    sequence order (the official patch-type order)."""
    rc = coords[members.to(coords.device)].cpu()
    key = rc[:, 1] * (int(rc[:, 2].max()) + 2) + rc[:, 2]
    return members[torch.sort(key, stable=True).indices]


def neighbour_similarity(x: torch.Tensor, order: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """[n] cosine of each token (in ``order``) with the token before it at the same position; FIRST for the
    first of each position."""
    a, b = x[order[:-1]].float(), x[order[1:]].float()
    sim = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    rc = coords[order.to(coords.device)][:, 1:].cpu()
    same = (rc[1:] == rc[:-1]).all(-1).to(sim.device)
    return torch.cat([sim.new_full((1,), FIRST), torch.where(same, sim, sim.new_tensor(FIRST))])


def merge_runs(x: torch.Tensor, order: torch.Tensor, marked: torch.Tensor):
    """x [N, D]; marked [n] bool over ``order`` -> (removed [N] bool, x' [N, D] with each run's anchor (the
    token before the run in ``order``) the mean of its state and the run's; groups [N]: anchor of each token)."""
    n_all = x.shape[0]
    removed = torch.zeros(n_all, dtype=torch.bool)
    anchor_of = torch.arange(n_all)
    out = x.float().clone()
    m = marked.cpu().tolist()
    ordl = order.cpu().tolist()
    j = 0
    while j < len(m):
        if not m[j] or j == 0:
            j += 1
            continue
        end = j
        while end < len(m) and m[end]:
            end += 1
        anchor, run = ordl[j - 1], ordl[j:end]
        members = torch.tensor([anchor] + run, device=x.device)
        out[anchor] = x[members].float().sum(0) / len(members)
        removed[run] = True
        anchor_of[run] = anchor
        j = end
    return removed, out, anchor_of


class FrameFusionPruner(Pruner):
    name = "framefusion"
    wheres = ("llm",)
    default_where = "llm"
    default_layer = 3
    default_keep = "auto"
    adaptive = True
    signals = Signals("llm.last_query")
    options = {
        "cost": Option("float", "keep=auto: the share of the unpruned LLM compute over the video tokens", 0.3,
                       low=0.01, high=1),
        "threshold": Option("float", "merge a token whose cosine to the same position in the previous frame is "
                                     ">= this (similarity_lower_bound)", 0.6, low=-1, high=1),
        "stop": Option("float", "merging ends at the first step merging fewer than this share (ratio_lower_bound)",
                       0.1, low=0, high=1)}

    def llm_steps(self, layer: int, options: dict) -> list[int]:
        """Steps before decoder layers 0..layer (the last: the prune at the latest)."""
        return list(range(layer + 1))

    def select(self, inp: StageInput) -> Selection:
        """One step: merge while merging is not finished, then the prune (see the module docstring)."""
        o = inp.options
        hist = inp.carry if isinstance(inp.carry, History) else History()
        last = not inp.layers_left  # None (a one-call stage) or 0: the stage's last step
        n, dev = inp.tokens.shape[0], inp.tokens.device
        video = inp.frames is not None and bool((inp.frames >= 0).any())
        vid = ((inp.frames if video else inp.coords[:, 0]).cpu() >= 0)
        keep_v = None if inp.keep is None else inp.keep - int((~vid).sum())
        alive, dest = torch.ones(n, dtype=torch.bool), torch.arange(n)
        merged, scores = None, torch.zeros(n)
        was_merged = hist.merged
        if not hist.pruned and vid.any() and not hist.merged:
            order = position_order(inp.coords, vid.nonzero().flatten())
            sim = neighbour_similarity(inp.tokens, order, inp.coords)
            scores[order] = sim.cpu()
            marked = self._merge_choice(sim.cpu(), hist, o, int(vid.sum()), keep_v, inp.llm_layers or 28)
            removed, merged, dest = merge_runs(inp.tokens, order, marked)
            alive = ~removed
        if not hist.pruned and vid.any() and (was_merged or last):  # the next attention after merging ended
            alive, scores = self._prune(inp, hist, alive, vid, keep_v, inp.llm_layers or 28)
        keep_idx = alive.nonzero().flatten()
        rank = torch.full((n,), -1, dtype=torch.long)
        rank[keep_idx] = torch.arange(keep_idx.numel())
        return Selection(keep_idx=keep_idx.to(dev), scores=scores.to(dev),
                         tokens=None if merged is None else merged[keep_idx.to(dev)].to(inp.tokens.dtype),
                         groups=rank[dest].to(dev), carry=hist)

    def _merge_choice(self, sim: torch.Tensor, hist: History, o: dict, n_v: int, keep_v, layers: int):
        """[n] bool: the tokens this merge step removes (in position order); updates ``hist``."""
        marked = sim >= self.option(o, "threshold")
        if keep_v is None:
            share = compute_share(hist.shares, self.option(o, "cost"), layers)
            capped, cap = float(marked.sum()) / n_v >= share, int(share * n_v)
        else:
            cap = max(n_v - keep_v, 0)
            capped = int(marked.sum()) >= cap
        if capped:  # the cap's most similar (ties: lower position); never a group's first token
            cap = min(cap, int((sim > FIRST).sum()))
            marked = torch.zeros_like(marked)
            marked[torch.sort(sim, descending=True, stable=True).indices[:cap]] = True
            hist.merged = hist.pruned = True
            return marked
        ratio = float(marked.sum()) / n_v
        hist.shares.append(ratio)
        hist.merged = ratio < self.option(o, "stop")
        return marked

    def _prune(self, inp: StageInput, hist: History, alive, vid, keep_v, layers: int):
        """The importance prune: (alive [n] bool after it, scores [n]: head-mean last-query attention)."""
        if inp.attn is None:
            raise ValueError("framefusion: the prune step needs the last prompt token's attention row (llm.last_query)")
        cand = (alive & vid).nonzero().flatten()
        if keep_v is None:
            count = round(cand.numel() * (1 - compute_share(hist.shares, self.option(inp.options, "cost"), layers)))
        else:
            count = min(keep_v, cand.numel())
        imp = inp.attn.float().mean(0).cpu()
        chosen = cand[torch.sort(imp[cand], descending=True, stable=True).indices[:count]]
        out = alive & ~vid
        out[chosen] = True
        hist.pruned = True
        return out, imp

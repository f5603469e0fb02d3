"""`aim`: AIM (Zhong et al., ICCV 2025, "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging
and Pruning").

Official code: LaVi-Lab/AIM (stored as dragonlzm/AIM).

Before the LLM (``llava/model/token_merge.py`` ``bipartite_soft_matching_merge``, called by
``llava/model/llava_arch.py`` ``get_2dPool`` on each video frame's projected, pooled features with
r = N // 2, then r = N // 4; deeper rounds N // 8, ... are commented out there): one round, on a frame's
current tokens in their current order, splits them into A (even positions) and B (odd), takes the cosine
similarity of the features themselves, each A token's best B match, and merges the r best-matched A tokens
(r capped at t // 2) into their matches by ``scatter_reduce("mean")`` with the B token itself included: a
plain mean, whatever each token already stands for (no size weighting). The round's output order is the
unmerged A tokens by decreasing similarity, then B in order; the next round splits that order.
Here: the same per item (image, tile or frame; ``keep`` split over items by size), round i removing
min(N // 2^i, t // 2, t - keep) tokens until ``keep`` remain, which is the official schedule (25 %: two
rounds) whenever ``keep`` is the count it reaches. A kept token stands at its B representative's (or the
unmerged A token's own) original position.

Inside the LLM (``other_packages/transformers/src/transformers/models/qwen2/modeling_qwen2.py``:
``get_importance``, called in ``Qwen2Attention.forward`` on the eager attention logits, and
``Qwen2Model.forward``): in every layer l >= l1 (Qwen2-7B: l1 = 14 of 28; ``LLM-Viewer/analyze_aim.py``:
13 of 32 for LLaMA-7B), PageRank over the layer's whole attention: M = softmax(logits / 0.1) per row
(causal, RoPE'd q and k, every token), dist = 1/S, five times dist = dist @ M, importance =
sqrt(mean over heads of dist^2); text tokens are always kept; the floor(N * rate[l]) most important visual
tokens (N: visual tokens entering the LLM, rate[l] = 1 - (l - l1 + 1) / 8) stay for layer l + 1 on.
Here a stage ``layer=K`` reads layer K-1's attention (``needs="all_rows"``: every row of the request's
tokens), so the official schedule for Qwen2-7B is ``aim:where=llm,layer=15,keep=⌊0.875N⌋; ...; layer=21,
keep=⌊0.125N⌋`` (N divisible by 8: 7N/8, 6N/8, ..., N/8).

Remaining differences: the official code masks pruned tokens instead of removing them, so in its later
pruning layers their query rows still count in PageRank's first step (dist is uniform over every token);
the engine removes them, so the first LLM stage matches exactly and later ones differ by those rows. Its
last step (rate 0: every visual token dropped from layer l1 + 8 on) is not a stage (keep >= 1). Its merged
tokens enter the LLM in the output order above, at consecutive positions; here in original order at their
representatives' slots, numbered consecutively before the LLM (``official_positions``; at an LLM stage their
original positions, the engine's rule there). The official repository merges
video frames only (images pass unmerged in ``llava_arch.py``); the paper also merges images, as here.
The official code runs in the model dtype (bf16 features, fp32 attention); here fp32 throughout.
"""
import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput, topk_sorted
from .grid import items, split_budget

TAU = 0.1  # get_importance(tau_imp=0.1)
ITERS = 5  # get_importance(iters=5), no damping (d=0)


def aim_merge(x: torch.Tensor, keep: int):
    """x [N, D] one item's features -> (keep_idx [k] sorted, merged [k, D] fp32, groups [N]); pure."""
    n = x.shape[0]
    feats = x.float()
    rep = torch.arange(n, device=x.device)  # original index each current token stands at
    owner = torch.arange(n, device=x.device)  # current position of the token each original one is in
    i = 0
    while feats.shape[0] > keep:
        i += 1
        t = feats.shape[0]
        r = min(max(n >> i, 1), t // 2, t - keep)
        a = torch.arange(0, t, 2, device=x.device)
        b = torch.arange(1, t, 2, device=x.device)
        unit = F.normalize(feats, dim=-1)
        best, match = (unit[a] @ unit[b].T).max(dim=-1)
        order = best.argsort(descending=True, stable=True)
        src, unm = order[:r], order[r:]  # positions within A
        dst = match[src]  # positions within B
        count = torch.ones(b.numel(), device=x.device).index_add(0, dst, torch.ones(r, device=x.device))
        merged_b = feats[b].index_add(0, dst, feats[a[src]]) / count[:, None]
        new_pos = torch.empty(t, dtype=torch.long, device=x.device)
        new_pos[a[unm]] = torch.arange(unm.numel(), device=x.device)
        new_pos[b] = unm.numel() + torch.arange(b.numel(), device=x.device)
        new_pos[a[src]] = unm.numel() + dst
        owner = new_pos[owner]
        rep = torch.cat([rep[a[unm]], rep[b]])
        feats = torch.cat([feats[a[unm]], merged_b])
    order = rep.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=x.device)
    return rep[order], feats[order], rank[owner]


def pagerank_importance(attn: torch.Tensor) -> torch.Tensor:
    """attn [H, S, S] softmax rows (0 where masked) -> [S] AIM importance, sqrt(mean_h dist_h^2).

    softmax(logits / tau) == softmax(log(softmax(logits)) / tau): the row's log-sum-exp cancels."""
    m = torch.softmax(attn.float().log() / TAU, dim=-1).nan_to_num(0.0)  # [H, S, S]
    dist = torch.full((m.shape[0], 1, m.shape[-1]), 1.0 / m.shape[-1], device=m.device)
    for _ in range(ITERS):
        dist = dist @ m
    return dist[:, 0].pow(2).mean(0).sqrt()


class AIMPruner(Pruner):
    name = "aim"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    wheres = ("pre_llm", "llm")
    default_where = "pre_llm"
    default_layer = 15
    signals = Signals("llm.all_rows")

    def select(self, inp: StageInput) -> Selection:
        if inp.seq_attn is not None:  # inside the LLM
            scores = pagerank_importance(inp.seq_attn)[inp.seq_vis.to(inp.seq_attn.device)]
            return Selection(keep_idx=topk_sorted(scores, inp.keep), scores=scores)
        n = inp.tokens.shape[0]
        keep_idx, tokens, groups = [], [], torch.full((n,), -1, dtype=torch.long)
        groups_of = items(inp.coords)
        for g, k in zip(groups_of, split_budget([len(x) for x in groups_of], inp.keep)):
            if k == 0:
                continue
            idx, merged, owner = aim_merge(inp.tokens[g.to(inp.tokens.device)], k)
            groups[g] = owner.cpu() + sum(len(x) for x in keep_idx)
            keep_idx.append(g[idx.cpu()])
            tokens.append(merged)
        keep_idx = torch.cat(keep_idx)
        order = keep_idx.argsort()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        groups = torch.where(groups >= 0, rank[groups.clamp_min(0)], -1)
        return Selection(keep_idx=keep_idx[order].to(inp.tokens.device),
                         tokens=torch.cat(tokens)[order.to(inp.tokens.device)].to(inp.tokens.dtype),
                         groups=groups.to(inp.tokens.device))

"""`tome`: Token Merging (Bolya et al., 2023, "Token Merging: Your ViT But Faster").

Bipartite soft matching, repeated until ``keep`` tokens remain: the current tokens split
alternately into A (even positions) and B (odd); each A token's best B match by cosine
similarity of the metric (tower keys where recorded, else the tokens); the r most similar
A tokens (r = min(|A|, tokens still to remove)) merge into their matches by size-weighted
average (sizes carried across stages). Surviving tokens keep their original position.

Choice: ToMe's proportional attention (log-size bias inside later attention) is not applied.
"""
import torch
import torch.nn.functional as F

from .base import Pruner, Selection, StageInput, keys_or_tokens


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, keep: int):
    """x [N, D], metric [N, d], sizes [N] -> (keep_idx [k], merged x [k, D] fp32, groups [N]); pure, deterministic."""
    n = x.shape[0]
    alive = torch.arange(n, device=x.device)  # entering index of each current token
    owner = torch.arange(n, device=x.device)  # current position of the group each entering token is in
    s = sizes.float().to(x.device)
    xs, ms = x.float() * s[:, None], metric.float() * s[:, None]  # size-weighted sums
    while alive.numel() > keep:
        m = ms / s[:, None]
        a = torch.arange(0, alive.numel(), 2, device=x.device)
        b = torch.arange(1, alive.numel(), 2, device=x.device)
        best, match = (F.normalize(m[a], dim=-1) @ F.normalize(m[b], dim=-1).T).max(dim=1)
        r = min(a.numel(), alive.numel() - keep)
        order = best.argsort(descending=True, stable=True)[:r]
        src, dst = a[order], b[match[order]]
        xs, ms, s = xs.index_add(0, dst, xs[src]), ms.index_add(0, dst, ms[src]), s.index_add(0, dst, s[src])
        survivors = torch.ones(alive.numel(), dtype=torch.bool, device=x.device)
        survivors[src] = False
        new_pos = torch.cumsum(survivors.long(), 0) - 1
        remap = new_pos.clone()
        remap[src] = new_pos[dst]
        owner = remap[owner]
        alive, xs, ms, s = alive[survivors], xs[survivors], ms[survivors], s[survivors]
    return alive, xs / s[:, None], owner


class ToMePruner(Pruner):
    name = "tome"
    wheres = ("vision", "pre_llm")
    vision_needs = frozenset({"keys"})

    def select(self, inp: StageInput) -> Selection:
        sizes = inp.sizes if inp.sizes is not None else torch.ones(inp.tokens.shape[0])
        keep_idx, merged, groups = bipartite_merge(inp.tokens, keys_or_tokens(inp), sizes.to(inp.tokens.device), inp.keep)
        return Selection(keep_idx=keep_idx, tokens=merged.to(inp.tokens.dtype), groups=groups)

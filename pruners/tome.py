"""`tome`: Token Merging (Bolya et al., 2023, "Token Merging: Your ViT But Faster").

Official code: facebookresearch/ToMe, ``tome/merge.py`` (``bipartite_soft_matching``, ``merge_wavg``)
and ``tome/patch/timm.py`` (one round of r per ViT block, between attention and MLP, on the block's
keys averaged over heads; sizes carried; the class token protected).

One round, as ``bipartite_soft_matching``: the current tokens, in the current order, split alternately
into A (even positions) and B (odd); each A token's best B match by cosine similarity of the metric
(tower keys where recorded, else the tokens); the r A tokens with the most similar matches merge into
them by size-weighted average (``merge_wavg``, sizes carried across stages), r capped at half the
tokens (t // 2). The round's output order is the official one: the unmerged A tokens by decreasing
similarity (in their own order when a class token is protected), then B. A stage repeats rounds on
that order (r = the tokens still to remove) until ``keep`` remain, so ``keep >= N / 2`` is exactly one
official round. At a vision-tower stage the tower's CLS stands first in the sequence (``inp.prefix``):
as the official ``class_token`` it sits in A, is never merged, and shifts which patches are A and B.
The merged tokens are returned in original order, each at its representative's original position (a
B token, or an unmerged A token itself).

Differences from the official code: its rounds are one per ViT layer, each on that layer's fresh keys;
a stage here merges at one point, so the metric of a later round is the size-weighted average of the
merged keys (merged like the tokens). At a vision stage before layer L the merge follows layer L-1's
MLP (the official one precedes it); the selection is the same, the merged states are those after the
MLP. ToMe's proportional attention (log-size bias inside later attention) is not applied.
"""
import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput, keys_or_tokens


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, keep: int, class_token: bool = False):
    """x [N, D], metric [N, d], sizes [N] -> (keep_idx [k], merged x [k, D] fp32, groups [N]); pure, deterministic.

    ``class_token``: a protected token precedes these in the sequence (it is not among them)."""
    dev = x.device
    cur = torch.arange(x.shape[0], device=dev)  # entering index of each current token, in the official order
    owner = torch.arange(x.shape[0], device=dev)  # current position of the token each entering token is in
    s = sizes.float().to(dev)
    xs, ms = x.float() * s[:, None], metric.float() * s[:, None]  # size-weighted sums
    lead = int(class_token)
    while cur.numel() > keep:
        t = cur.numel()
        r = min(t // 2, t - keep)  # official: min(r, (tokens - protected) // 2)
        pos = torch.arange(lead, lead + t, device=dev)  # sequence position of each current token
        a, b = (pos % 2 == 0).nonzero().flatten(), (pos % 2 == 1).nonzero().flatten()
        m = F.normalize(ms / s[:, None], dim=-1)
        best, match = (m[a] @ m[b].T).max(dim=1)
        order = best.argsort(descending=True, stable=True)
        unm = order[r:].sort().values if class_token else order[r:]
        src, dst = a[order[:r]], b[match[order[:r]]]
        xs, ms, s = xs.index_add(0, dst, xs[src]), ms.index_add(0, dst, ms[src]), s.index_add(0, dst, s[src])
        new = torch.cat([a[unm], b])  # the round's output, as current positions
        remap = torch.empty(t, dtype=torch.long, device=dev)
        remap[new] = torch.arange(new.numel(), device=dev)
        remap[src] = remap[dst]
        owner = remap[owner]
        cur, xs, ms, s = cur[new], xs[new], ms[new], s[new]
    perm = cur.argsort()
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(perm.numel(), device=dev)
    return cur[perm], (xs / s[:, None])[perm], rank[owner]


class ToMePruner(Pruner):
    name = "tome"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    wheres = ("vision", "pre_llm")
    signals = Signals("tower.keys")

    def select(self, inp: StageInput) -> Selection:
        sizes = inp.sizes if inp.sizes is not None else torch.ones(inp.tokens.shape[0])
        keep_idx, merged, groups = bipartite_merge(inp.tokens, keys_or_tokens(inp), sizes.to(inp.tokens.device),
                                                   inp.keep, class_token=inp.prefix > 0)
        return Selection(keep_idx=keep_idx, tokens=merged.to(inp.tokens.dtype), groups=groups)

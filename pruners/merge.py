"""Merging helpers shared by the merge-based pruners (pure tensor functions)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_groups(tokens: torch.Tensor, keep_idx: torch.Tensor, assign: torch.Tensor,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted average of each kept token with the tokens assigned to it.

    tokens [N, D]; keep_idx [k]; assign [N]: position in keep_idx each token joins (-1: dropped;
    kept tokens must be assigned to themselves); weights [N] (default 1).
    Returns (merged [k, D] in tokens' dtype, groups [N] = assign).
    """
    w = torch.ones(tokens.shape[0], device=tokens.device) if weights is None else weights.float().to(tokens.device)
    assign = assign.to(tokens.device)
    use = assign >= 0
    k = keep_idx.numel()
    num = torch.zeros(k, tokens.shape[1], device=tokens.device).index_add_(0, assign[use], tokens[use].float() * w[use, None])
    den = torch.zeros(k, device=tokens.device).index_add_(0, assign[use], w[use])
    return (num / den.clamp_min(1e-12)[:, None]).to(tokens.dtype), assign


def nearest(metric: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each source position, the index (into ``targets``) of the most cosine-similar target."""
    m = F.normalize(metric.float(), dim=-1)
    return (m[sources] @ m[targets].T).argmax(dim=1)


def assignment(n: int, keep_idx: torch.Tensor, sources: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
    """[n] groups: kept tokens -> their own position, ``sources`` -> position ``to``, others -> -1."""
    g = torch.full((n,), -1, dtype=torch.long, device=keep_idx.device)
    g[keep_idx] = torch.arange(keep_idx.numel(), device=keep_idx.device)
    g[sources] = to.to(g.device)
    return g

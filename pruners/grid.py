"""Grid helpers shared by the spatial pruners (pure tensor functions)."""
from __future__ import annotations

import math

import torch


def split_budget(sizes: list[int], keep: int) -> list[int]:
    """Split ``keep`` over groups of the given sizes in proportion (largest remainder), each <= its size."""
    total = sum(sizes)
    raw = [keep * s / total for s in sizes]
    out = [min(int(math.floor(r)), s) for r, s in zip(raw, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: raw[i] - out[i], reverse=True)
    for i in order:
        if sum(out) == keep:
            break
        if out[i] < sizes[i]:
            out[i] += 1
    return out


def lattice_shape(h: int, w: int, k: int) -> tuple[int, int]:
    """(kh, kw): rows and columns of the smallest lattice of >= k cells with the grid's aspect ratio."""
    kh = min(h, max(1, round(math.sqrt(k * h / w))))
    kw = min(w, math.ceil(k / kh))
    return min(h, math.ceil(k / kw)), kw


def grid_stride(h: int, w: int, k: int) -> torch.Tensor:
    """Raster indices of k cells spread evenly over an h x w grid: [k], sorted.

    Picks a kh x kw lattice of cell centres (kh*kw >= k, aspect ratio kept), then drops
    evenly spaced extras so exactly k remain.
    """
    kh, kw = lattice_shape(h, w, k)
    rows = ((torch.arange(kh) + 0.5) * h / kh).long()
    cols = ((torch.arange(kw) + 0.5) * w / kw).long()
    cells = (rows[:, None] * w + cols[None, :]).flatten()
    if cells.numel() > k:
        cells = cells[((torch.arange(k) + 0.5) * cells.numel() / k).long()]
    return cells.sort().values


def items(coords: torch.Tensor) -> list[torch.Tensor]:
    """Token positions of each item (image, tile or frame), in item order. coords: [N, 3]."""
    c = coords[:, 0].cpu()
    return [(c == it).nonzero().flatten() for it in c.unique(sorted=True)]


def lattice(coords: torch.Tensor, keep: int) -> torch.Tensor:
    """[keep] sorted positions spread evenly over every item's grid (budget split by item size).

    A full h x w grid gets a 2-D lattice; a ragged layout (e.g. rows ending in newline tokens,
    or a grid already thinned by an earlier stage) gets an even stride in sequence order.
    """
    coords = coords.cpu()
    groups = items(coords)
    out = []
    for g, k in zip(groups, split_budget([len(g) for g in groups], keep)):
        if k == 0:
            continue
        rows, cols = coords[g, 1], coords[g, 2]
        h, w = int(rows.max()) + 1, int(cols.max()) + 1
        raster = rows * w + cols
        if h * w == len(g) and raster.unique().numel() == len(g):
            pos = torch.empty(h * w, dtype=torch.long)
            pos[raster] = torch.arange(len(g))
            out.append(g[pos[grid_stride(h, w, k)]])
        else:
            out.append(g[((torch.arange(k) + 0.5) * len(g) / k).long()])
    return torch.cat(out).sort().values if out else torch.zeros(0, dtype=torch.long)

"""`uniform`: an even spatial stride over each image's token grid (a baseline)."""
import math

import torch

from .base import Pruner, Selection, StageInput


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


def grid_stride(h: int, w: int, k: int) -> torch.Tensor:
    """Raster indices of k cells spread evenly over an h x w grid: [k], sorted.

    Picks a kh x kw lattice of cell centres (kh*kw >= k, aspect ratio kept), then drops
    evenly spaced extras so exactly k remain.
    """
    kh = min(h, max(1, round(math.sqrt(k * h / w))))
    kw = min(w, math.ceil(k / kh))
    kh = min(h, math.ceil(k / kw))
    rows = ((torch.arange(kh) + 0.5) * h / kh).long()
    cols = ((torch.arange(kw) + 0.5) * w / kw).long()
    cells = (rows[:, None] * w + cols[None, :]).flatten()
    if cells.numel() > k:
        cells = cells[((torch.arange(k) + 0.5) * cells.numel() / k).long()]
    return cells.sort().values


class UniformPruner(Pruner):
    name = "uniform"

    def select(self, inp: StageInput) -> Selection:
        coords = inp.coords.cpu()
        items = coords[:, 0].unique(sorted=True)
        groups = [(coords[:, 0] == it).nonzero().flatten() for it in items]
        budgets = split_budget([len(g) for g in groups], inp.keep)
        keep = []
        for g, k in zip(groups, budgets):
            if k == 0:
                continue
            rows, cols = coords[g, 1], coords[g, 2]
            h, w = int(rows.max()) + 1, int(cols.max()) + 1
            if h * w == len(g):  # a full grid: 2-D lattice over raster cells
                raster = rows * w + cols
                pos = torch.empty(h * w, dtype=torch.long)
                pos[raster] = torch.arange(len(g))
                keep.append(g[pos[grid_stride(h, w, k)]])
            else:  # ragged layout (e.g. rows with newline tokens): even stride in sequence order
                keep.append(g[((torch.arange(k) + 0.5) * len(g) / k).long()])
        return Selection(keep_idx=torch.cat(keep).sort().values.to(inp.tokens.device))

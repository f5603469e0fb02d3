"""`pool`: spatial average pooling to the budget (the simplest merging baseline).

Each item's grid is cut into the same kh x kw lattice of cells as `uniform` picks its tokens
from; every token joins the nearest cell centre of its item (continuous cell centres, so on a
grid the lattice divides this is exactly average pooling), and the kept token of each cell
(its centre cell) becomes the cell's average. The budget is exact.
"""
import torch

from .base import Pruner, Selection, StageInput
from .grid import items, lattice, lattice_shape, split_budget
from .merge import merge_groups


class PoolPruner(Pruner):
    name = "pool"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"

    def select(self, inp: StageInput) -> Selection:
        keep_idx = lattice(inp.coords, inp.keep).to(inp.tokens.device)
        c = inp.coords.to(inp.tokens.device).float()
        centre = c[keep_idx].clone()
        for g, k in zip(items(inp.coords), split_budget([len(g) for g in items(inp.coords)], inp.keep)):
            in_item = torch.isin(keep_idx, g.to(keep_idx.device))
            h, w = float(c[g, 1].max()) + 1, float(c[g, 2].max()) + 1
            kh, kw = lattice_shape(int(h), int(w), k) if k else (1, 1)
            for axis, size, n in ((1, h, kh), (2, w, kw)):  # the continuous centre of each kept token's cell
                cell = (centre[in_item, axis] * n / size).floor()
                centre[in_item, axis] = (cell + 0.5) * size / n - 0.5
        d = (c[:, None, 1:] - centre[None, :, 1:]).pow(2).sum(-1) + 1e6 * (c[:, None, 0] != centre[None, :, 0])
        assign = d.argmin(dim=1)
        assign[keep_idx] = torch.arange(keep_idx.numel(), device=assign.device)
        tokens, groups = merge_groups(inp.tokens, keep_idx, assign, inp.sizes)
        return Selection(keep_idx=keep_idx, tokens=tokens, groups=groups)

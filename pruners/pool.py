"""`pool`: spatial average pooling to the budget (the simplest merging baseline).

Each item's grid gets the same even lattice of cells as `uniform`; every token joins its
nearest lattice cell (grid distance, ties to the lower index) and each kept token becomes
the average of its cell. The budget is exact.
"""
import torch

from .base import Pruner, Selection, StageInput
from .grid import lattice
from .merge import merge_groups


class PoolPruner(Pruner):
    name = "pool"

    def select(self, inp: StageInput) -> Selection:
        keep_idx = lattice(inp.coords, inp.keep).to(inp.tokens.device)
        c = inp.coords.to(inp.tokens.device).float()
        kc = c[keep_idx]
        # distance inside the same item only
        d = (c[:, None, 1:] - kc[None, :, 1:]).pow(2).sum(-1) + 1e6 * (c[:, None, 0] != kc[None, :, 0])
        assign = d.argmin(dim=1)
        assign[keep_idx] = torch.arange(keep_idx.numel(), device=assign.device)
        tokens, groups = merge_groups(inp.tokens, keep_idx, assign, inp.sizes)
        return Selection(keep_idx=keep_idx, tokens=tokens, groups=groups)

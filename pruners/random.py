"""`random`: keep a seeded uniformly random subset (a baseline)."""
import torch

from .base import Pruner, Selection, StageInput
from .options import Option


class RandomPruner(Pruner):
    name = "random"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    options = {"seed": Option("int", "seed of the draw (default: the request's seed)", None, low=0)}

    def select(self, inp: StageInput) -> Selection:
        gen = torch.Generator().manual_seed(int(inp.options.get("seed", inp.seed)))
        perm = torch.randperm(inp.tokens.shape[0], generator=gen)
        return Selection(keep_idx=perm[: inp.keep].sort().values.to(inp.tokens.device))

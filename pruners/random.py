"""`random`: keep a seeded uniformly random subset (a baseline)."""
import torch

from .base import Pruner, Selection, StageInput


class RandomPruner(Pruner):
    name = "random"
    option_names = ("seed",)

    def select(self, inp: StageInput) -> Selection:
        gen = torch.Generator().manual_seed(int(inp.options.get("seed", inp.seed)))
        perm = torch.randperm(inp.tokens.shape[0], generator=gen)
        return Selection(keep_idx=perm[: inp.keep].sort().values.to(inp.tokens.device))

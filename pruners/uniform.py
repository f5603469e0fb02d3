"""`uniform`: an even spatial stride over each image's token grid (a baseline)."""
from .base import Pruner, Selection, StageInput
from .grid import lattice


class UniformPruner(Pruner):
    name = "uniform"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"

    def select(self, inp: StageInput) -> Selection:
        return Selection(keep_idx=lattice(inp.coords, inp.keep).to(inp.tokens.device))

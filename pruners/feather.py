"""`feather`: FEATHER (Endo et al., 2024, "Feather the Throttle: Revisiting Visual Token Pruning
for Vision-Language Model Acceleration").

FastV's criterion is biased by RoPE towards the bottom of the image; FEATHER scores each visual
token by the last prompt token's attention computed with RoPE removed from the query and the
keys (head mean), keeps the top ones, and adds uniform grid samples (``uniform``, default 0.5
of the budget) so every region keeps coverage. The paper's two stages are two plan entries,
e.g. ``feather:layer=8,keep=0.3;feather:layer=16,keep=0.3``.
"""
import torch

from .base import Pruner, Selection, StageInput, topk_sorted
from .options import Option
from .grid import lattice


class FeatherPruner(Pruner):
    name = "feather"
    wheres = ("llm",)
    default_where = "llm"
    default_layer = 8
    options = {"uniform": Option("float", "share of the budget taken by uniform grid samples", 0.5, low=0, high=1)}
    needs = "last_query_norope"

    def select(self, inp: StageInput) -> Selection:
        scores = inp.attn.float().mean(0)
        n_uni = min(inp.keep, int(round(self.option(inp.options, "uniform") * inp.keep)))
        taken = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        if n_uni:
            taken[lattice(inp.coords, n_uni).to(scores.device)] = True
        rest = (~taken).nonzero().flatten()
        taken[rest[topk_sorted(scores[rest], inp.keep - n_uni)]] = True
        return Selection(keep_idx=taken.nonzero().flatten(), scores=scores)

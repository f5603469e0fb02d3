"""`feather`: FEATHER (Endo et al., ICCV 2025, "Feather the Throttle: Revisiting Visual Token Pruning
for Vision-Language Model Acceleration").

Official code: markendo/FEATHER, ``prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py``
(``FastVLlamaModel.forward``, ``calculate_attention_weight``), run by ``vlm-evaluation/scripts/eval_feather.sh``
with ``fastv_k=[8, 16]``, ``fastv_ratio=0.7``, ``fastv_predefined_mask="no_rope_s=3"``:

- criterion, computed in layer K-1 for the pruning before layer K: the last prompt token's query against the
  visual tokens' keys, neither rotated (no RoPE), scaled by 1/sqrt(d); softmax over the *visual keys only*;
  mean over heads;
- first stage (before layer 8): the top floor(0.3 N) visual tokens by that score, united with the uniform
  samples ``grid[::3, ::3]`` of the square grid (rows and columns 0, 3, 6, ...); all of the union is kept, so
  its size depends on the overlap (172..236 of 576);
- second stage (before layer 16): the top floor(0.09 N) of the survivors (N: the original count) by the same
  score over the survivors; no uniform samples.

Here ``keep`` fixes the count (the engine's contract). The kept set is the uniform samples (every ``stride``-th
row and column of each item's grid, from the tokens' original (row, col); ``stride=0``: none) plus the best
scoring other tokens up to ``keep``. That is the official union whenever ``keep`` is its size, since
top-a ∪ grid = grid ∪ (the best keep - |grid| tokens off the grid). The official plan at 576 tokens is
``feather:layer=8,keep=K;feather:layer=16,keep=51,stride=0`` with K = |top-172 ∪ grid| of the request.
Scores: the engine's RoPE-free last-token softmax row (normalised over every key) renormalised per head over
the visual tokens, which is exactly the official visual-only softmax, then the head mean.

Remaining differences: the official first-stage count is data-dependent, here it is ``keep``; with
keep < |grid| an evenly spaced subset of the grid is kept (the official code never does that); the official
code takes the softmax in fp32, casts it to the model dtype and averages heads there, here it stays fp32
(its README: "results can vary slightly based on attention implementation"); the official grid assumes one
square image (``int(sqrt(N))``), here each item (image, tile, frame) of any shape uses its own (row, col).
"""
import torch

from .base import Pruner, Selection, Signals, StageInput, topk_sorted
from .options import Option


def feather_scores(attn: torch.Tensor) -> torch.Tensor:
    """attn [H, N] (softmax mass each visual token gets, per head) -> [N] per-head softmax over the visual
    tokens only, averaged over heads."""
    a = attn.float()
    return (a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)).mean(0)


def stride_samples(coords: torch.Tensor, stride: int) -> torch.Tensor:
    """coords [N, 3] (item, row, col) -> sorted positions with row % stride == 0 and col % stride == 0."""
    if stride <= 0:
        return torch.zeros(0, dtype=torch.long)
    c = coords.cpu()
    return ((c[:, 1] % stride == 0) & (c[:, 2] % stride == 0)).nonzero().flatten()


def feather_select(scores: torch.Tensor, grid: torch.Tensor, keep: int) -> torch.Tensor:
    """scores [N], grid [G] sorted positions -> [keep] sorted: the grid, then the best others by score."""
    if grid.numel() > keep:  # never in the official code: an evenly spaced subset of the samples
        grid = grid[((torch.arange(keep) + 0.5) * grid.numel() / keep).long()]
    taken = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    taken[grid.to(scores.device)] = True
    rest = (~taken).nonzero().flatten()
    taken[rest[topk_sorted(scores[rest], keep - grid.numel())]] = True
    return taken.nonzero().flatten()


class FeatherPruner(Pruner):
    name = "feather"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("llm",)
    default_where = "llm"
    default_layer = 8
    options = {"stride": Option("int", "uniform samples: every stride-th row and column of each grid "
                                       "(the official first stage: 3; 0: none, its second stage)", 3, low=0)}
    signals = Signals("llm.last_query_norope")

    def select(self, inp: StageInput) -> Selection:
        scores = feather_scores(inp.attn)
        grid = stride_samples(inp.coords, self.option(inp.options, "stride"))
        return Selection(keep_idx=feather_select(scores, grid, inp.keep), scores=scores)

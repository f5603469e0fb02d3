"""`sparsevlm`: SparseVLM (Zhang et al., 2024, "SparseVLM: Visual Token Sparsification for
Efficient Vision-Language Model Inference").

Inside the LLM, in layer K-1: every text token after the image attends to the visual tokens
(rows of softmax attention, O(text x tokens)). Text raters are the text tokens whose attention
mass on the image (head mean) is at least the mean over text tokens; a visual token's score is
its attention from the raters, averaged over raters and heads. The top ``keep - recycled``
survive. Recycling: the best ``pool`` fraction (default 0.3) of the pruned tokens by score is
grouped around the ``recycle`` x keep (default 0.1) highest of them by cosine similarity of the
hidden states, and each group becomes one token (the mean) at its seed's position. Several
stages (the paper prunes at a few layers) are several plan entries, e.g.
``sparsevlm:layer=2,keep=0.5;sparsevlm:layer=6,keep=0.25;sparsevlm:layer=15,keep=0.1``.

Choice: recycled tokens count inside the budget, so ``keep`` stays exact.
"""
import torch

from .base import Pruner, Selection, StageInput, topk_sorted
from .options import Option
from .merge import assignment, merge_groups, nearest


def rater_scores(text_attn: torch.Tensor) -> torch.Tensor:
    """text_attn [H, T, N] -> [N] mean attention from the rater rows (mass on the image >= mean)."""
    mass = text_attn.float().mean(0).sum(-1)  # [T]
    raters = mass >= mass.mean()
    return text_attn.float().mean(0)[raters].mean(0)


class SparseVLMPruner(Pruner):
    name = "sparsevlm"
    wheres = ("llm",)
    default_where = "llm"
    default_layer = 2
    options = {"recycle": Option("float", "share of the budget given to recycled (clustered) tokens", 0.1, low=0, high=1),
               "pool": Option("float", "share of the pruned tokens pooled into the recycled ones", 0.3, low=0, high=1)}
    needs = "text_rows"

    def select(self, inp: StageInput) -> Selection:
        n = inp.tokens.shape[0]
        scores = rater_scores(inp.text_attn)
        n_rec = min(int(round(self.option(inp.options, "recycle") * inp.keep)), inp.keep - 1, n - inp.keep)
        top = topk_sorted(scores, inp.keep - n_rec)
        if n_rec <= 0:
            return Selection(keep_idx=top, scores=scores)
        pruned = torch.ones(n, dtype=torch.bool, device=scores.device)
        pruned[top] = False
        pruned = pruned.nonzero().flatten()
        n_pool = max(n_rec, int(round(self.option(inp.options, "pool") * pruned.numel())))
        pool = pruned[topk_sorted(scores[pruned], min(n_pool, pruned.numel()))]
        seeds = pool[topk_sorted(scores[pool], n_rec)]
        keep_idx = torch.cat([top, seeds]).sort().values
        members = pool[~torch.isin(pool, seeds)]
        to = torch.searchsorted(keep_idx, seeds)[nearest(inp.tokens, members, seeds)]
        tokens, groups = merge_groups(inp.tokens, keep_idx, assignment(n, keep_idx, members, to))
        return Selection(keep_idx=keep_idx, scores=scores, tokens=tokens, groups=groups)

"""`prumerge`: LLaVA-PruMerge+ (Shang et al., 2024, "LLaVA-PruMerge: Adaptive Token Reduction").

1. Importance: CLS attention (head mean) in the feature layer.
2. Selection: with ``keep=auto`` the outliers of the importance by the IQR rule
   (score > Q3 + 1.5 IQR) plus, for PruMerge+, ``spatial`` x as many spatially uniform samples
   (default 3, which lands near the paper's ~25% on LLaVA-1.5); with a fixed ``keep``, the
   outliers (the top ``keep`` of them if there are more) topped up with uniform samples, then
   with the highest remaining scores.
3. Merging: every pruned token joins its most key-similar kept token, and each kept token
   becomes the CLS-attention-weighted mean of its group.

Choice: the paper lets kept tokens absorb their k nearest neighbours (groups may overlap);
here each pruned token joins exactly one kept token so the merge groups partition the image.
"""
import torch

from .base import Pruner, Selection, StageInput, TowerRecord, cls_or_surrogate, keys_or_tokens, topk_sorted
from .options import Option
from .grid import lattice
from .merge import assignment, merge_groups, nearest


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return (scores > q3 + 1.5 * (q3 - q1)).nonzero().flatten()


class PruMergePruner(Pruner):
    name = "prumerge"
    wheres = ("pre_llm",)
    options = {"spatial": Option("int", "PruMerge+: spatially uniform samples added per outlier token", 3, low=0)}
    vision_needs = frozenset({"cls", "keys"})
    adaptive = True

    def tower_score(self, rec: TowerRecord, layers: list[int]):
        return rec.cls[layers[-1]][:, :, rec.prefix:].float().mean(1)

    def select(self, inp: StageInput) -> Selection:
        n = inp.tokens.shape[0]
        scores = cls_or_surrogate(inp)
        outliers = iqr_outliers(scores)
        keep = inp.keep
        if keep is None:  # adaptive
            keep = min(n, max(1, outliers.numel()) * (1 + self.option(inp.options, "spatial")))
        chosen = outliers if outliers.numel() <= keep else outliers[topk_sorted(scores[outliers], keep)]
        taken = torch.zeros(n, dtype=torch.bool, device=scores.device)
        taken[chosen] = True
        for pos in lattice(inp.coords, keep).to(scores.device):  # spatial samples, in lattice order
            if int(taken.sum()) >= keep:
                break
            taken[pos] = True
        if int(taken.sum()) < keep:  # lattice cells were outliers already: top up by score
            rest = (~taken).nonzero().flatten()
            taken[rest[topk_sorted(scores[rest], keep - int(taken.sum()))]] = True
        keep_idx = taken.nonzero().flatten()
        pruned = (~taken).nonzero().flatten()
        to = nearest(keys_or_tokens(inp), pruned, keep_idx)
        weights = scores * (inp.sizes.to(scores.device) if inp.sizes is not None else 1)
        tokens, groups = merge_groups(inp.tokens, keep_idx, assignment(n, keep_idx, pruned, to), weights)
        return Selection(keep_idx=keep_idx, scores=scores, tokens=tokens, groups=groups)

"""`visionzip`: VisionZip (Yang et al., 2024, "VisionZip: Longer is Better but Not Necessary").

Dominant tokens: the top ``keep - contextual`` patches by CLS attention summed over heads in
the feature layer. Contextual tokens: the remaining patches, in order, give ``contextual``
evenly strided targets; every other remaining patch joins the target whose head-averaged key
is most cosine-similar, and each target becomes the mean of its group (the target included).
Default split follows the paper's 54 + 10 for 64: contextual = round(keep * 10 / 64).

Choices: a contextual token sits at its target's position (positions stay original).
Without a CLS token the score is ``cls_or_surrogate``'s; without tower keys, the tokens
themselves are compared.
"""
import torch

from .base import Pruner, Selection, StageInput, TowerRecord, cls_or_surrogate, keys_or_tokens, topk_sorted
from .options import Option
from .merge import assignment, merge_groups, nearest


def contextual_count(keep: int, n: int, option) -> int:
    c = round(keep * 10 / 64) if option is None else int(option)
    c = max(c, 1) if keep >= 2 and option is None else c
    return max(0, min(c, keep - 1, n - keep))


class VisionZipPruner(Pruner):
    name = "visionzip"
    wheres = ("vision", "pre_llm")
    options = {"contextual": Option("int", "contextual (merged) tokens among the kept (default: 10 per 64)", None,
                                    low=0)}
    vision_needs = frozenset({"cls", "keys"})

    def tower_score(self, rec: TowerRecord, layers: list[int]):
        return rec.cls[layers[-1]][:, :, rec.prefix:].float().sum(1)

    def select(self, inp: StageInput) -> Selection:
        n = inp.tokens.shape[0]
        scores = cls_or_surrogate(inp)
        c = contextual_count(inp.keep, n, self.option(inp.options, "contextual"))
        dominant = topk_sorted(scores, inp.keep - c)
        if c == 0:
            return Selection(keep_idx=dominant, scores=scores)
        rest = torch.ones(n, dtype=torch.bool, device=scores.device)
        rest[dominant] = False
        rest = rest.nonzero().flatten()
        step = max(1, rest.numel() // c)
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
        is_target[torch.arange(0, rest.numel(), step, device=rest.device)[:c]] = True
        targets, others = rest[is_target], rest[~is_target]
        keep_idx = torch.cat([dominant, targets]).sort().values
        pos = torch.searchsorted(keep_idx, targets)  # each target's position among the kept
        to = pos[nearest(keys_or_tokens(inp), others, targets)]
        tokens, groups = merge_groups(inp.tokens, keep_idx, assignment(n, keep_idx, others, to))
        return Selection(keep_idx=keep_idx, scores=scores, tokens=tokens, groups=groups)

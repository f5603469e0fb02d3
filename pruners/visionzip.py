"""`visionzip`: VisionZip (Yang et al., 2024, "VisionZip: Longer is Better but Not Necessary").

What the official code does (dvlab-research/VisionZip, ``visionzip/clip_encoder.py``,
``CLIPVisionTower_VisionZip.forward``; ``visionzip/utils.py``; ``visionzip/main.py``), for
``visionzip(model, dominant=D, contextual=C)`` on LLaVA-1.5 (README: D=54, C=10 for 64 tokens):
  * signals from the feature layer (``attentions[-2]``, ``hidden_states[-2]``, keys of layer 22 of
    24, i.e. the layer whose output LLaVA feeds the projector): the CLS row of the softmax attention
    ``[H, 1+N]`` and the head-averaged raw keys ``k_proj(ln1(x))`` ``[1+N, d]`` of that layer;
  * dominant: the CLS hidden state plus the top ``D - 1`` patches by CLS attention summed over
    heads (``main.py`` passes ``dominant_num = dominant - 1``);
  * contextual: the R remaining patches, in index order, give C targets at positions
    ``arange(0, R, max(1, R // C))[:C]``; every other remaining patch joins the target whose
    L2-normalised key is most similar (dot product, argmax); a contextual token is
    ``target + mean(tokens joining it)`` (the target alone when none join), not a group mean;
  * merging happens on the feature-layer hidden states, before the projector; the output is
    ``[CLS, dominant patches in index order, contextual tokens in target order]``.

What we do: the same. Signal ``tower.features``: on LLaVA the engine hands the feature-layer hidden
states (the projector's input) and projects the merged tokens, as the official code does; on other
families the LLM-side tokens merge. The CLS hidden state reaches the LLM only where the model's
``vision_feature_select_strategy`` is "full": there it is a visual token (``cls_slots``), always kept
and never merged, so ``keep=64`` is exactly the official ``dominant=54, contextual=10`` (CLS + 53 + 10).
With "default" (the Hugging Face LLaVA-1.5 checkpoints) the projector never sees a CLS hidden state
and the engine keeps exactly ``keep`` patches, so the CLS slot goes to one more dominant patch: the
top ``keep - C`` patches are dominant, and kept set, groups and merged tokens are exactly the
patches the official code keeps when run with ``dominant = keep - C + 1`` (its CLS row removed).

Remaining differences: (1) "default": no CLS token reaches the LLM (see above); (2) order: a
contextual token sits at its target's slot and original position and the kept tokens stay in raster
order, where the official code appends the contextual tokens after the dominant ones; (3) scores and
merges in float32 (the official code: the model dtype); (4) LLaVA-NeXT: the official code compresses
every anyres tile to D + C tokens and drops the row-end newline tokens, we share ``keep`` over the
image's tokens (newlines score 0 and have zero keys); (5) the official code reads the keys of layer
22 (a 24-layer CLIP) and the attention of ``attentions[-2]``; we read both in the feature layer (the
same layer on LLaVA-1.5). ``where=vision`` (prune inside the tower) is ours, not the official code's.
Default split: the README's 54 + 10 for 64, i.e. C = round(keep * 10 / 64): 20 at 128, 30 at 192
(the official code states only 54 + 10; its ``visionzip()`` defaults are dominant=191, contextual=30).
Without a CLS tower the score is ``cls_or_surrogate``'s and there is no CLS slot; without tower keys
the tokens themselves are compared.
"""
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput, TowerRecord, cls_or_surrogate, keys_or_tokens, topk_sorted
from .options import Option


def contextual_count(keep: int, n: int, option) -> int:
    """Contextual tokens among ``keep`` of ``n``: the option, else round(keep * 10 / 64) (at least 1)."""
    c = round(keep * 10 / 64) if option is None else int(option)
    c = max(c, 1) if keep >= 2 and option is None else c
    return max(0, min(c, keep - 1, n - keep))


def contextual_targets(rest: torch.Tensor, c: int) -> torch.Tensor:
    """Positions in ``rest`` [R] (remaining tokens, index order) of the c evenly strided targets -> [c]."""
    step = max(1, rest.numel() // c)
    return torch.arange(0, rest.numel(), step, device=rest.device)[:c]


def merge_contextual(tokens: torch.Tensor, metric: torch.Tensor, targets: torch.Tensor,
                     others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of ``others`` [M] joins its most key-similar target of ``targets`` [c].

    tokens [N, D], metric [N, d] (keys). Returns (contextual [c, D] float32 = target + mean of the
    tokens joining it, to [M] index into ``targets`` of each other token).
    """
    m = F.normalize(metric.float(), dim=-1)  # official: metric / norm (eps only for all-zero rows)
    to = (m[others] @ m[targets].T).argmax(dim=1)  # [M]
    x = tokens.float()
    counts = torch.bincount(to, minlength=targets.numel()).clamp_min(1).to(x.dtype)  # [c]
    joined = torch.zeros(targets.numel(), x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, to, x[others])
    return x[targets] + joined / counts[:, None], to


def cls_slots(coords: torch.Tensor, tower_score: torch.Tensor | None) -> torch.Tensor:
    """[N] bool: the CLS hidden states among the visual tokens (LLaVA with the "full" feature strategy).

    coords [N, 3] (item, row, col); tower_score [N] or None. A CLS slot is its item's first token, in
    row 0 past every other column of the item (a non-patch token), with no CLS attention (score 0, as the
    engine gives non-patch tokens). Without tower signals there is none.
    """
    out = torch.zeros(coords.shape[0], dtype=torch.bool, device=coords.device)
    if tower_score is None:
        return out
    for item in coords[:, 0].unique():
        idx = (coords[:, 0] == item).nonzero().flatten()
        first, rest = int(idx[0]), idx[1:]
        beyond = rest.numel() == 0 or bool(coords[first, 2] > coords[rest, 2].max())
        out[first] = bool(coords[first, 1] == 0) and beyond and float(tower_score[first]) == 0.0
    return out


class VisionZipPruner(Pruner):
    name = "visionzip"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("vision", "pre_llm")
    options: ClassVar[dict] = {
        "contextual": Option("int", "contextual (merged) tokens among the kept (default: 10 per 64)", None, low=0)}
    signals = Signals("tower.cls", "tower.keys", "tower.features")  # LLaVA: merge before the projector

    def tower_score(self, rec: TowerRecord, layers: list[int]):
        return rec.cls[layers[-1]][:, :, rec.prefix:].float().sum(1)  # CLS attention summed over heads

    def select(self, inp: StageInput) -> Selection:
        n = inp.tokens.shape[0]
        scores = cls_or_surrogate(inp)  # [N]
        cls = cls_slots(inp.coords, inp.tower_score).to(scores.device)  # [N] always kept, never merged
        if int(cls.sum()) >= inp.keep:  # no room for a patch besides them: patches only
            cls[:] = False
        n_cls = int(cls.sum())
        c = min(contextual_count(inp.keep, n, self.option(inp.options, "contextual")), inp.keep - n_cls)
        dominant = topk_sorted(scores.masked_fill(cls, float("-inf")), inp.keep - n_cls - c)  # [keep - n_cls - c]
        kept = torch.cat([cls.nonzero().flatten(), dominant])
        if c == 0:
            return Selection(keep_idx=kept.sort().values, scores=scores)
        is_rest = ~cls
        is_rest[dominant] = False
        rest = is_rest.nonzero().flatten()  # [R] index order
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
        is_target[contextual_targets(rest, c)] = True
        targets, others = rest[is_target], rest[~is_target]  # [c], [R - c]
        contextual, to = merge_contextual(inp.tokens, keys_or_tokens(inp), targets, others)
        keep_idx = torch.cat([kept, targets]).sort().values  # [keep]
        groups = torch.full((n,), -1, dtype=torch.long, device=keep_idx.device)
        groups[keep_idx] = torch.arange(keep_idx.numel(), device=keep_idx.device)
        groups[others] = groups[targets][to]
        tokens = inp.tokens.clone()
        tokens[targets] = contextual.to(tokens.dtype)
        return Selection(keep_idx=keep_idx, scores=scores, tokens=tokens[keep_idx], groups=groups)

"""`prumerge`: LLaVA-PruMerge+ (Shang et al., 2024, "LLaVA-PruMerge: Adaptive Token Reduction").

What the official code does (42Shawn/LLaVA-PruMerge, ``llava/model/multimodal_encoder/clip_encoder.py``,
``CLIPVisionTower.token_prune_merge_advanced_plus``, called by ``forward`` with ``if_adaptive=True``;
``token_prune_merge_advanced`` is plain PruMerge; ``outlier_dectection`` is the IQR rule), for the N = 576
patches of LLaVA-1.5:
  * signals: forward hooks on ``q_proj`` / ``k_proj`` of ``encoder.layers[23]``, the last CLIP-L layer, the
    one *after* the feature layer (``hidden_states[-2]`` is layer 22's output, i.e. layer 23's input). Its
    q and k [1+N, C] are used whole, as one C-wide head (C = 1024, all heads concatenated):
    ``a = softmax(q_cls . K^T / sqrt(C))`` over CLS and patches, then the patch columns ``a [N]``;
  * outliers: ``np.percentile`` (linear interpolation) of ``a``: Q1, Q3; outliers are ``a > Q3 + 1.5 IQR``;
    ``ratio = c / N`` and the top ``int(N * ratio)`` (= c) patches by ``a`` are kept;
  * PruMerge+ spatial samples: ``step = int(1 / ratio)``, the samples ``arange(0, 575, int(step / 3))``
    (the whole flattened grid at one fixed stride, the last patch excluded), minus those already outliers;
  * merge (features = ``hidden_states[-2]`` patches, before the projector): each kept token i becomes
    ``x_i + sum_j a_j x_j`` over its 32 nearest tokens j != i (kept ones included) by the cosine of the
    L2-normalised full-width keys of layer 23; the weights are the raw CLS attentions (not normalised);
  * one extra token, ``sum_j a_j x_j`` over every token not kept, is appended; the output order is:
    outliers by descending ``a``, spatial samples in index order, the extra token.
  * fixed ratio (``if_adaptive=False``, "for training"): the top ``int(N r)`` by ``a`` plus
    ``arange(int(step / 2), 575, step)``, ``step = int(1 / r)``, duplicates not removed.

What we do: the same signals (``tower.qk`` at tower layer ``last + 1``; the CLS attention
and the full-width keys travel together as ``tower_score`` channels), the same selection, merge and
extra token, on the feature-layer hidden states (signal ``tower.features``; the engine projects them).
  * ``keep=auto``: the official adaptive path. The extra ("summary") token takes the slot of the last
    token not kept (N - 1 unless it is an outlier, i.e. where the official code appends it), so
    ``c + samples + 1`` tokens survive, as in the official output.
  * fixed ``keep`` = K: the official fixed-ratio path with ``r = m / 2N`` for the m = K - 1 tokens beside
    the summary: the spatial samples ``arange(step // 2, N - 1, step)``, ``step = 2N // m``, then the
    highest ``a`` among the rest fill the m places (the official top ``m // 2`` plus, where a sample was
    already a top token, the next ones, so the count is exactly K).
  * ``spatial=0``: plain PruMerge (outliers only, or the top m by ``a``); ``summary=false`` drops the
    extra token.
The integer strides equal the official float expressions at N = 576 and 64 (checked for every count).

Remaining differences: (1) order: the kept tokens stay at their own slots in raster order, where the
official code orders them by score then samples; the summary token sits at a real token's slot;
(2) ``groups`` records each pruned token as part of the summary token (the neighbour sums overlap and
include kept tokens, which a partition cannot show); (3) the official ``575`` is written ``N - 1`` for
other grids, its division by zero when no token is an outlier becomes one outlier (the top token), and
it computes in fp16 where we use float32, its IQR over a batch's images together (LLaVA evaluates one at a
time) where we take each image's, and its scale from the features' width (equal to q's for CLIP);
``keep`` = N is the identity (the official formula would still add neighbour sums); (4) on LLaVA-NeXT
(not in the official code) the rule runs once over all of an image's tokens (tiles and newline tokens,
which score 0). Without a CLS tower the score is ``cls_or_surrogate``'s and the tokens themselves are
compared.
"""

import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput, TowerRecord, cls_or_surrogate, keys_or_tokens
from .options import Option

NEIGHBOURS = 32  # tokens each kept token absorbs (official: topk k=32)


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """[N] -> sorted indices of scores > Q3 + 1.5 IQR (quartiles linearly interpolated, as np.percentile)."""
    s = scores.double()
    q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=s.dtype, device=s.device))
    return (s > q3 + 1.5 * (q3 - q1)).nonzero().flatten()


def full_width_cls(q: torch.Tensor, k: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [n, H, S, d] of one layer, used as one head of width C = H d.

    Returns (CLS attention softmax(q_0 . K^T / sqrt(C)) over all S, patch columns [n, S - prefix],
    keys [n, S - prefix, C] float32)."""
    n, h, s, d = k.shape
    keys = k.float().transpose(1, 2).reshape(n, s, h * d)  # [n, S, C]
    q_cls = q[:, :, 0].float().reshape(n, h * d)  # [n, C]
    attn = torch.softmax((keys @ q_cls[:, :, None])[..., 0] / (h * d) ** 0.5, dim=-1)  # [n, S]
    return attn[:, prefix:], keys[:, prefix:]


def adaptive_choice(scores: torch.Tensor, spatial: int) -> torch.Tensor:
    """keep=auto: [N] -> sorted indices of the IQR outliers plus, when ``spatial`` > 0, every
    ((N // c) // spatial)-th token of 0..N-2 (c outliers; official: spatial = 3)."""
    n = scores.numel()
    chosen = iqr_outliers(scores)
    if chosen.numel() == 0:  # the official code divides by zero here: take the top token
        chosen = scores.argmax().view(1)
    if spatial > 0:
        stride = max(1, (n // chosen.numel()) // spatial)
        chosen = torch.cat([chosen, torch.arange(0, n - 1, stride, device=scores.device)]).unique()
    return chosen


def budget_choice(scores: torch.Tensor, m: int, spatial: int) -> torch.Tensor:
    """Fixed budget: [N] -> m sorted indices: the samples ``arange(step // 2, N - 1, step)``,
    ``step = 2N // m`` (official fixed-ratio path, r = m / 2N), then the highest scores among the rest
    (only the highest scores when ``spatial`` = 0)."""
    n = scores.numel()
    taken = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if spatial > 0 and m >= 2:
        step = 2 * n // m
        taken[torch.arange(step // 2, n - 1, step, device=scores.device)[:m]] = True
    rest = (~taken).nonzero().flatten()
    taken[rest[torch.topk(scores[rest].float(), m - int(taken.sum())).indices]] = True
    return taken.nonzero().flatten()


def merge_neighbours(tokens: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor,
                     k: int = NEIGHBOURS) -> torch.Tensor:
    """Each chosen token plus the score-weighted sum of its k nearest other tokens.

    tokens [N, D], keys [N, C] (cosine of the L2-normalised keys), scores [N] (the raw weights),
    chosen [m] -> [m, D] float32: x_i + sum_{j in kNN(i), j != i} a_j x_j."""
    x, n = tokens.float(), tokens.shape[0]
    kn = F.normalize(keys.float(), dim=-1)  # [N, C]
    sim = kn[chosen] @ kn.T  # [m, N]
    sim[torch.arange(chosen.numel(), device=sim.device), chosen] = float("-inf")  # not itself
    near = sim.topk(min(k, n - 1), dim=1).indices  # [m, k]
    a = scores.float().to(x.device)
    weights = torch.zeros_like(sim).scatter_(1, near, a[near])  # [m, N]
    return x[chosen] + weights @ x


class PruMergePruner(Pruner):
    name = "prumerge"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("pre_llm",)
    options = {
        "spatial": Option("int", "PruMerge+ spatial samples: with keep=auto every (N // outliers // spatial)-th "
                                 "token (official 3); with a fixed keep, half the budget on a stride; 0: plain "
                                 "PruMerge", 3, low=0),
        "summary": Option("bool", "keep the official extra token (CLS-weighted sum of every pruned token) at "
                                  "the last pruned token's slot", True),
    }
    signals = Signals("tower.qk", "tower.features")  # LLaVA: merge the feature-layer hidden states, before the projector
    adaptive = True

    def tower_layers(self, last: int, options: dict) -> list[int]:
        return [last + 1]  # the official hooks layer 23 of 24, the one after the feature layer

    def tower_score(self, rec: TowerRecord, layers: list[int]) -> torch.Tensor:
        """[n, P, 1 + C]: the full-width CLS attention of each patch, then its full-width key."""
        attn, keys = full_width_cls(*rec.qk[layers[-1]], rec.prefix)
        return torch.cat([attn[..., None], keys], dim=-1)

    def select(self, inp: StageInput) -> Selection:
        n = inp.tokens.shape[0]
        if inp.tower_score is not None and inp.tower_score.dim() == 2:
            scores, keys = inp.tower_score[:, 0].float(), inp.tower_score[:, 1:].float()  # [N], [N, C]
        else:  # no CLS tower: the documented surrogate
            scores, keys = cls_or_surrogate(inp), keys_or_tokens(inp)
        if inp.keep == n:  # keep-everything is the identity (engine contract; the official formula would still merge)
            return Selection(keep_idx=torch.arange(n, device=scores.device), scores=scores)
        spatial, summary = self.option(inp.options, "spatial"), self.option(inp.options, "summary")
        if inp.keep is None:
            chosen = adaptive_choice(scores, spatial)
            summary = summary and chosen.numel() < n
        else:
            summary = summary and 2 <= inp.keep < n
            chosen = budget_choice(scores, inp.keep - int(summary), spatial)
        merged = merge_neighbours(inp.tokens, keys, scores, chosen)  # [m, D]
        is_pruned = torch.ones(n, dtype=torch.bool, device=scores.device)
        is_pruned[chosen] = False
        pruned = is_pruned.nonzero().flatten()
        rows, keep_idx = merged, chosen
        if summary:  # the extra token, at the slot of the last pruned token
            extra = (scores[pruned, None] * inp.tokens[pruned].float()).sum(0, keepdim=True)  # [1, D]
            keep_idx, order = torch.cat([chosen, pruned[-1:]]).sort()
            rows = torch.cat([merged, extra])[order]
        groups = torch.full((n,), -1, dtype=torch.long, device=keep_idx.device)
        groups[keep_idx] = torch.arange(keep_idx.numel(), device=keep_idx.device)
        if summary:
            groups[pruned] = int(groups[pruned[-1]])
        return Selection(keep_idx=keep_idx, scores=scores, tokens=rows.to(inp.tokens.dtype), groups=groups)

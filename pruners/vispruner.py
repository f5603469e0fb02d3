"""`vispruner`: VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues
for Effective Token Pruning in VLMs").

What the official code does (Theia-4869/VisPruner, ``llava/model/llava_arch.py``,
``LlavaMetaForCausalLM.encode_images``; signals from ``llava/model/multimodal_encoder/clip_encoder.py``,
``CLIPVisionTower.feature_select``), for ``--visual_token_num T --important_ratio r`` (default r = 0.5):
  * signals of the feature layer: ``hidden_states[-2][:, 1:]`` (the projector's input, N patches) and the
    CLS row of ``attentions[-2]`` over the patches, ``[:, :, 0, 1:]`` (the softmax over CLS + patches,
    not renormalised), averaged over heads;
  * important: the first ``T_imp = int(T * r)`` patches of ``argsort(attention, descending)``;
  * diverse (``T_div = T - T_imp``): the other patches, in that descending-attention order, are thinned
    by rounds of ``r' = min(8, R - T_div)`` removals until ``T_div`` remain: the even positions of the
    current order (A) against the odd ones (B), each A token scored by its largest cosine similarity to
    a B token (features divided by their norm), the ``r'`` highest-scoring A tokens removed; the next
    order is the surviving A tokens in descending score order, then B in order;
  * kept: important + diverse, as a mask over the patches (original order), then the projector.
  ``T`` is the count the official code keeps: ``keep = T``.

What we do: the same, on the stage's tokens with the signals ``tower.cls`` (head-mean CLS attention of
the feature layer: the default ``tower_score``) and ``tower.features`` (on LLaVA the feature layer's
hidden states, the projector's input, as the official code compares; nothing is merged).
Differences: (1) a round removes at most the |A| = ceil(R / 2) tokens A has. The official code raises a
shape error where R is odd (``R // 2 - r`` rows are expanded against ``ceil(R / 2) - r`` kept A tokens:
N - int(T * r) odd, e.g. T = 66 of 576) or where a round is due more removals than A has (under 16 tokens
left to thin, e.g. T = 8 of 576); where it runs with no error ours keeps the same set, except one odd-R
case where it runs but drops its last A token (R // 2 == r', e.g. T = 56, r = 0.85 of 64: 55 kept): we
keep it, so ``keep`` tokens are always kept (LLaVA-1.5's 192 / 128 / 64 at r = 0.5 never meet either);
(2) argsorts are stable (ties by index; the official ``argsort`` leaves
ties unspecified: only exact ties differ, e.g. zero-scored LLaVA-NeXT newline tokens); (3) scores and
similarities in float32 (the official code: the model dtype); normalisation by ``F.normalize`` (eps 1e-12,
the official divides by the norm: only all-zero rows differ); (4) one budget over the stage's tokens (the
official code keeps T per anyres tile of LLaVA-NeXT; on LLaVA-1.5's one image the same), and on families
that give no projector input (all but LLaVA-1.5) similarity on the stage's (projected) tokens; (5) LLaVA with
``vision_feature_select_strategy="full"``: the CLS hidden state is a visual token scored 0 (the official
``cls_patch`` branch scores it by its own CLS self-attention). Towers without a CLS token (SigLIP, Qwen):
importance from ``cls_or_surrogate``, similarity on the stage's tokens. ``where=vision`` is ours.
"""
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput, cls_or_surrogate
from .options import Option

ROUND = 8  # the official code removes at most 8 tokens per matching round (hard-coded)


def split_counts(keep: int, important_ratio: float) -> tuple[int, int]:
    """(important, diverse) counts of ``keep``: the official ``int(T * r)`` and ``T - int(T * r)``."""
    important = int(keep * important_ratio)
    return important, keep - important


def remove_duplicates(residual: torch.Tensor, unit: torch.Tensor, diverse: int) -> torch.Tensor:
    """Thin ``residual`` [R] (token indices, descending importance) to ``diverse`` indices -> [<= R].

    unit [N, C]: L2-normalised features. Each round: A = residual[::2], B = residual[1::2]; an A token's
    score is its largest cosine similarity to B; the ``min(8, R - diverse, |A|)`` highest are removed;
    the next residual is the surviving A (descending score) then B (order kept).
    """
    while diverse > 0:
        n = residual.numel()
        a_idx, b_idx = residual[::2], residual[1::2]  # [ceil(n/2)], [n//2]
        r = min(ROUND, n - diverse, a_idx.numel())
        if r <= 0:
            break
        best = (unit[a_idx] @ unit[b_idx].T).max(dim=-1).values  # [ceil(n/2)]
        distinct = best.argsort(descending=True, stable=True)[r:]  # [ceil(n/2) - r]
        residual = torch.cat([a_idx[distinct], b_idx])
    return residual


def vispruner_select(scores: torch.Tensor, feats: torch.Tensor, keep: int, important_ratio: float) -> torch.Tensor:
    """scores [N] (CLS attention), feats [N, C] (feature-layer states) -> [keep] kept indices, ascending."""
    important, diverse = split_counts(keep, important_ratio)
    order = scores.float().argsort(descending=True, stable=True)  # [N]
    kept = order[:important]
    if diverse > 0:
        unit = F.normalize(feats.float(), dim=-1)
        kept = torch.cat([kept, remove_duplicates(order[important:], unit, diverse)])
    return kept.sort().values


class VisPrunerPruner(Pruner):
    name = "vispruner"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("pre_llm", "vision")
    options: ClassVar[dict] = {
        "important_ratio": Option("float", "share of keep chosen by CLS attention (the rest: diverse tokens, "
                                           "official --important_ratio)", 0.5, low=0, high=1)}
    signals = Signals("tower.cls", "tower.features")  # LLaVA: similarity of the projector's input

    def select(self, inp: StageInput) -> Selection:
        scores = cls_or_surrogate(inp)  # [N] head-mean CLS attention (default tower_score)
        ratio = self.option(inp.options, "important_ratio")
        return Selection(keep_idx=vispruner_select(scores, inp.tokens, inp.keep, ratio), scores=scores)

"""`flowcut`: FlowCut (Tong et al., NeurIPS 2025, "FlowCut: Rethinking Redundancy via Information Flow
for Efficient Vision-Language Models"), as the official code does it (TungChintao/FlowCut,
``flowcut/modeling_clip_flowcut.py`` CLIPAttention_forward / CLIPEncoderLayer_forward /
CLIPEncoder_forward, ``flowcut/utils_flowcut.py`` compute_score / adaptive_prune_ratio).

Default (``where=vision``, one plan stage, e.g. ``flowcut:keep=64``): progressive pruning inside the
CLIP tower; the tokens it drops never reach the later tower layers. With F the stage's last layer
(default the feature layer the LLM reads, 22 on LLaVA-1.5; the official ``select_layer`` is
``len(layers) - 2``, the same layer), at every tower layer l = 0..F-1 while more than ``keep`` patches
are alive, over the alive patches of that layer:
    a_l = CLS row of the attention softmax, head mean              (attn[:, :, 0, 1:].mean(1))
    s_l = softmax over all tokens (CLS included) of v_CLS . v_j per head, unscaled, head mean
    n_l = L1 norm of the head-mean value vector                    (|mean_h v_j|_1)
    score_l = (a_l / sum a_l + s_l / sum s_l) * n_l
    acc = score_0 at the first layer, then acc = 0.5 acc + 0.5 score_l
After every layer l with rpl = F - l - 1 even (so the steps are before layers F, F-2, ... >= 1), the
alive N patches drop to max(N - r, keep), the top of ``acc`` surviving, with
    r = round((N - keep) / sqrt(rpl) * (1 - (H(a_l / sum a_l) / log N)^2))      (rpl > 0)
and at rpl = 0 (before layer F) exactly ``keep`` survive; the running score of the survivors goes on.
Dropped tokens are discarded (no merging, no recycling); layer F and the rest of the tower run on CLS +
``keep`` patches; the LLM gets the ``keep`` patch features of layer F in their original order. The
official wrapper asks for target_num + 1 tokens (CLS included), so 64 / 128 / 192 patches reach the LLM.
The stage's recorded scores (``Result.scores``) are each patch's running score at the last step it entered.

Differences that remain: the official rounding and softmaxes run in the model's dtype (fp16), ours in
fp32; for a batch of images the official code prunes max(r) over the batch at each step (the tensors
must stay rectangular), and so does this stage over the images of one engine batch: a request batched
with others may keep a different set than alone (identical for a batch of one image, as the official
LLaVA evaluation runs). The entropy takes 0 log 0 = 0 (the official code gives NaN).

``where=pre_llm`` (an option, not FlowCut's own placement): the same steps replayed after the tower ran
in full, on the signals of its layers 0..F-1 (F the feature layer), restricted to the alive patches. It
selects differently from the progressive stage, as the per-head softmaxes were normalised over every
token (dropped ones too) before the head mean, and later layers' hidden states saw the dropped tokens;
the tower saves nothing. It is there for families without vision-tower stages (LLaVA-NeXT, where a
request's tiles are one set; the official NeXT code prunes each tile to keep/2, then again in the LLM).
"""
import math

import torch

from .base import Pruner, Selection, Signals, StageInput, TowerRecord


def layer_score(sig: torch.Tensor) -> torch.Tensor:
    """sig [N, 3] (CLS attention, CLS-value softmax, head-mean value L1) of the alive patches -> [N] score."""
    a, s, v = sig.unbind(-1)
    return (a / a.sum() + s / s.sum()) * v


def running_score(sig: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
    """sig [N, L, 3] of L consecutive layers, carry [N] or None (no layer before) -> [N] the EMA after them."""
    acc = carry
    for t in range(sig.shape[1]):
        score = layer_score(sig[:, t])
        acc = score if acc is None else 0.5 * acc + 0.5 * score
    return acc


def step_count(cls_attn: torch.Tensor, keep: int, rpl: int) -> int:
    """How many of the N alive patches survive a step with ``rpl`` layers left, from its CLS attention [N]."""
    n = cls_attn.numel()
    if n <= keep:
        return n
    if rpl == 0:
        return keep
    prob = cls_attn / cls_attn.sum()
    ratio = -torch.special.xlogy(prob, prob).sum() / math.log(n)
    r = int(torch.round((n - keep) / rpl ** 0.5 * (1 - ratio ** 2)))
    return max(n - r, keep)


def top(acc: torch.Tensor, k: int) -> torch.Tensor:
    """[k] indices of the k largest of acc [N], ascending."""
    return torch.topk(acc, k).indices.sort().values


class FlowCutPruner(Pruner):
    name = "flowcut"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("vision", "pre_llm")
    default_where = "vision"
    signals = Signals(required=("tower.cls", "tower.values"))
    progressive = True

    def tower_layers(self, last: int, options: dict) -> list[int]:
        return list(range(last + 1))

    def vision_steps(self, last: int, options: dict) -> list[int]:
        return list(range(2 - last % 2, last + 1, 2))  # before layers last, last - 2, ... >= 1

    def tower_score(self, rec: TowerRecord, layers: list[int]) -> torch.Tensor:
        """[n, P, 3 * L]: per layer (CLS attention, CLS-value softmax, head-mean value L1) of every patch."""
        p = rec.prefix
        chans = []
        for layer in layers:
            chans += [rec.cls[layer][:, :, p:].float().mean(1), rec.value_attn[layer][:, :, p:].float().mean(1),
                      rec.value_l1[layer][:, p:].float()]
        return torch.stack(chans, dim=-1)

    def step_keep(self, inp: StageInput) -> int:
        sig = inp.tower_score.float().view(inp.tokens.shape[0], -1, 3)  # [N, L, 3]
        return step_count(sig[:, -1, 0], inp.keep, inp.layers_left)

    def select(self, inp: StageInput) -> Selection:
        n = inp.tokens.shape[0]
        sig = inp.tower_score.float().view(n, -1, 3)  # [N, L, 3]
        if inp.layers_left is not None:  # one step inside the tower: the layers since the last step
            acc = running_score(sig, None if inp.carry is None else inp.carry.to(sig.device))
            keep_idx = top(acc, inp.keep)
            return Selection(keep_idx=keep_idx, scores=acc, carry=acc[keep_idx])
        sig = sig[:, :-1]  # before the LLM: layers 0..F-1 of the tower, F the feature layer
        alive, acc, scores = torch.arange(n, device=sig.device), None, torch.zeros(n, device=sig.device)
        for t in range(sig.shape[1]):
            if alive.numel() <= inp.keep:
                break
            acc = running_score(sig[alive, t:t + 1], acc)
            scores[alive] = acc
            rpl = sig.shape[1] - t - 1
            if rpl % 2 == 0:
                kept = top(acc, step_count(sig[alive, t, 0], inp.keep, rpl))
                alive, acc = alive[kept], acc[kept]
        return Selection(keep_idx=alive, scores=scores)

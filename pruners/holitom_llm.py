"""`holitom_llm`: HoliTom's inner-LLM merge (Shao et al., 2025, "HoliTom: Holistic Token Merging for Fast
Video Large Language Models"), the stage after `holitom`'s outer one (plan: ``holitom:keep=..;holitom_llm``).

Transcribed from the official code, cokeshao/HoliTom ``holitom/modeling_qwen2.py::Qwen2Model_holitom.forward``
(enabled by HOLITOM_k and HOLITOM_r; ``scripts/eval_ov-7b_holitom.sh``: K = 18, r = 0.5 on LLaVA-OneVision-7B's
28-layer Qwen2), at the prefill, before decoder layer K:

1. layer K-1's attention (eager, ``output_attentions``) of the LAST token to the visual tokens (all of the
   request's visual tokens after the outer stage, the newline included), averaged over heads;
2. the top round(L (1 - r)) of them are kept (``topk``);
3. similarity: cosine of each other visual token's hidden state (layer K's input) with each kept one, computed
   once; then, for each non-kept token in sequence order, its most similar kept token t becomes
   h_t = (h_t + h_i) / 2 -- PAIRWISE IN SEQUENCE (a kept token that absorbs m tokens weighs the last one 1/2,
   the one before 1/4, ..., its own state 1/2^m), not a plain mean;
4. the non-kept tokens leave the sequence; the kept keep their original position ids.

Ours: ``keep`` is the kept count (the official round(L (1 - r)); ``keep=0.5`` is r = 0.5), the signal is
``llm.last_query`` (layer K-1's last-prompt-token softmax row, the official row), default layer 21 of the 32-layer
rule (engine/plan.py scales it to K = 18 on a 28-layer LLM). float32 merge (the official: bf16); ties in
attention or similarity to the lower index (the official ``topk`` / ``max`` leave them open). The official code
applies it to the batch's first request's image span only (``image_token_posi[0]``); here every request's own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput


def pairwise_merge(x: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] hidden states, kept [k] sorted -> (merged [k, D] float32, target [N]: the position in ``kept``
    each token ends in). Each non-kept token, in sequence order, halves into its most cosine-similar kept token."""
    n = x.shape[0]
    is_kept = torch.zeros(n, dtype=torch.bool)
    is_kept[kept.cpu()] = True
    rest = (~is_kept).nonzero().flatten()
    xf = x.float()
    target = torch.full((n,), -1, dtype=torch.long)
    target[kept.cpu()] = torch.arange(kept.numel())
    merged = xf[kept.to(x.device)].clone()
    if rest.numel() and kept.numel():
        sim = F.normalize(xf[rest.to(x.device)], dim=-1) @ F.normalize(merged, dim=-1).T  # [len(rest), k]
        best = sim.argmax(-1).cpu()
        target[rest] = best
        for i, t in zip(rest.tolist(), best.tolist()):
            merged[t] = (merged[t] + xf[i]) / 2
    return merged, target


class HoliTomLLMPruner(Pruner):
    name = "holitom_llm"
    wheres = ("llm",)
    default_where = "llm"
    default_layer = 21  # the official K = 18 of a 28-layer Qwen2 (LLaVA-OneVision-7B), on the 32-layer rule
    default_keep = 0.5  # HOLITOM_r = 0.5
    signals = Signals("llm.last_query")
    scored = True  # its scores rank every entering token (keep=auto,mass=)

    def select(self, inp: StageInput) -> Selection:
        scores = inp.attn.float().mean(dim=0)  # [H, N] -> [N]
        kept = torch.sort(scores.cpu(), descending=True, stable=True).indices[:inp.keep].sort().values
        merged, target = pairwise_merge(inp.tokens, kept)
        return Selection(keep_idx=kept.to(inp.tokens.device), scores=scores, tokens=merged.to(inp.tokens.dtype),
                         groups=target.to(inp.tokens.device))

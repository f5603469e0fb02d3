"""`cdpruner`: CDPruner (Zhang et al., 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity
for Token Pruning in MLLMs"): the kept set is the greedy MAP of a determinantal point process whose kernel is
the tokens' similarity conditioned on their relevance to the instruction. Attention-free.

What the official code does (Theia-4869/CDPruner, ``llava/model/llava_arch.py``,
``LlavaMetaForCausalLM.encode_images``; signals from ``llava/model/multimodal_encoder/clip_encoder.py``,
``CLIPVisionTower.forward`` / ``load_text_tower``), for ``--visual_token_num T``:
  * similarity: the projector's outputs (``mm_projector(image_features)``, N tokens), each divided by its
    norm, cast to float32, ``S = X X^T`` [N, N];
  * relevance: per-token CLIP image embeddings (the feature layer's patch states through the tower's
    ``post_layernorm`` and the paired CLIP model's ``visual_projection``) against the instruction's CLIP text
    embeddings (the question text, tokenised by the CLIP tokenizer and cut into 77-token segments, one
    ``text_embeds`` row each, M rows), both divided by their norm: ``r = mean_m(-cos(image_n, text_m))``,
    then ``r = (r - min r + 1e-6) / (max r - min r)`` (min / max over all the image's tokens and tiles);
  * kernel ``L = diag(r) S diag(r)``; fast greedy MAP inference: T times, take ``j = argmax d^2`` (first
    maximum), ``e = (L[j] - c[:, j] . c) / sqrt(d^2_j)``, append ``e`` to ``c``, ``d^2 -= e^2``,
    ``d^2_j = -inf``;
  * kept: the T picks, sorted (a mask over the tokens); nothing is merged. ``keep = T``. A commented-out
    variant weights relevance by ``exp(theta / (2 (1 - theta)) r)``: option ``theta`` (default: off, as run).

What we do: the same selection (``cdpruner_select``) on the stage's tokens, whose similarity is the official
one (the projector's outputs: the pre_llm stage's tokens on every family). Relevance: transformers' LLaVA
checkpoints carry neither a CLIP text tower nor the tower's ``visual_projection`` (and Qwen2-VL / 2.5-VL,
SigLIP towers have no paired text model at all), and the official repository has no fallback (it runs LLaVA
only), so on every family relevance uses the documented surrogate signal ``llm.instruction``: the request's
question (the prompt as given, no chat template) tokenised by the model's tokenizer and embedded by the LLM's
input embedding table (M rows, one per token), against the stage's tokens, which live in that same input
space; the official formula (negated mean cosine, min-max) is applied to it unchanged. The embedding pass is
metered apart (``scoring_s``; ``scoring_flops`` = 0: a table lookup has no multiply-adds). Differences:
(1) that surrogate relevance (above); (2) normalisation by ``F.normalize`` in float32 (eps 1e-12; the
official divides by the norm in the model dtype, then casts: only all-zero rows and fp16 rounding differ);
(3) one budget over the stage's tokens (the official code keeps T per anyres tile of LLaVA-NeXT, its relevance
min-max over all tiles: on LLaVA-1.5's one image the same); (4) a question with no tokens (empty prompt):
relevance 1 everywhere (a plain DPP over the similarity; the official CLIP tokenizer always gives a segment);
(5) once the kernel's rank is spent (no positive gain left: ``keep`` above the features' width or the number
of distinct tokens, e.g. identical LLaVA-NeXT newline tokens) the official loop divides by the square root
of a non-positive gain and picks NaN-scored duplicates, keeping fewer than T; ours stops there and fills the
rest with the unpicked tokens of highest relevance, so ``keep`` tokens are always kept (where the official
gains stay positive, as at LLaVA-1.5's 192 / 128 / 64 of 576 with 4096-wide features, the same set).
"""
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput
from .options import Option


def relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """image_embeds [N, E], text_embeds [M, E] -> [N]: negated mean cosine, min-max normalised (+1e-6)."""
    if text_embeds.shape[0] == 0:
        return torch.ones(image_embeds.shape[0], device=image_embeds.device)
    cos = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T  # [N, M]
    r = (-cos).mean(dim=-1)  # [N]
    return (r - r.min() + 1e-6) / (r.max() - r.min())


def conditional_kernel(features: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """features [N, D], rel [N] -> L [N, N] = diag(rel) . cosine similarity . diag(rel)."""
    unit = F.normalize(features.float(), dim=-1)  # [N, D]
    similarity = unit @ unit.T  # [N, N]
    return rel[:, None] * similarity * rel[None, :]


def greedy_map(kernel: torch.Tensor, keep: int, rel: torch.Tensor) -> torch.Tensor:
    """Fast greedy MAP inference of the DPP with kernel [N, N] -> [keep] picks, in the order picked.

    c [keep, N]: the rows of the incremental Cholesky factor; d2 [N]: each token's remaining marginal gain.
    Once no gain is left (best d2 <= 0: the kernel's rank is spent), the rest are the unpicked tokens by
    descending ``rel`` [N] (the official code goes on with NaN gains and picks duplicates).
    """
    n = kernel.shape[0]
    c = torch.zeros(keep, n, device=kernel.device)
    d2 = torch.diagonal(kernel).clone()  # [N]
    picks = []
    for i in range(keep):
        j = int(torch.argmax(d2))
        if not d2[j] > 0:
            return torch.cat([torch.tensor(picks, dtype=torch.long, device=kernel.device),
                              rest_by_relevance(picks, rel, keep - i)])
        picks.append(j)
        e = (kernel[j] - torch.einsum("t,tn->n", c[:i, j], c[:i])) / torch.sqrt(d2[j])  # [N]
        c[i] = e
        d2 -= torch.square(e)
        d2[j] = -float("inf")
    return torch.tensor(picks, dtype=torch.long, device=kernel.device)


def rest_by_relevance(picks: list[int], rel: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` tokens not in ``picks`` of highest ``rel`` [N] (ties by index) -> [count]."""
    free = torch.ones(rel.shape[0], dtype=torch.bool, device=rel.device)
    free[picks] = False
    order = rel.float().masked_fill(~free, -float("inf")).argsort(descending=True, stable=True)
    return order[:count]


def weighted(rel: torch.Tensor, theta: float | None) -> torch.Tensor:
    """The official code's optional (commented-out) weighting: exp(theta / (2 (1 - theta)) rel); None: rel."""
    if theta is None:
        return rel
    return torch.exp(theta / (2 * (1 - theta)) * rel)


def cdpruner_select(features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                    keep: int, theta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """features [N, D] (similarity), image_embeds [N, E] / text_embeds [M, E] (relevance)
    -> (kept [keep] ascending, relevance [N] as the kernel uses it)."""
    rel = weighted(relevance(image_embeds, text_embeds), theta)
    picks = greedy_map(conditional_kernel(features, rel), keep, rel)
    return picks.sort().values, rel


class CDPrunerPruner(Pruner):
    name = "cdpruner"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    wheres = ("pre_llm",)
    options: ClassVar[dict] = {
        "theta": Option("float", "relevance weight of the official code's commented-out variant (relevance -> "
                                 "exp(theta / (2 (1 - theta)) relevance)); default: none, as the official runs",
                        None, low=0, high=0.99)}
    signals = Signals("llm.instruction", required=("llm.instruction",))
    scored = True  # its scores rank every entering token (keep=auto,mass=)

    def select(self, inp: StageInput) -> Selection:
        instruction = inp.instruction  # [M, D] the question's LLM input embeddings (surrogate of CLIP text)
        if instruction is None:
            raise ValueError("cdpruner needs the instruction's embeddings (signal llm.instruction), which this "
                             "stage was not given")
        kept, rel = cdpruner_select(inp.tokens, inp.tokens, instruction.to(inp.tokens.device), inp.keep,
                                    self.option(inp.options, "theta"))
        return Selection(keep_idx=kept, scores=rel)

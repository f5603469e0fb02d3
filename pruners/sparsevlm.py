"""`sparsevlm`: SparseVLM (Zhang et al., 2024, "SparseVLM: Visual Token Sparsification for
Efficient Vision-Language Model Inference"), as its official code (Gumpest/SparseVLMs, default
branch ``main``, ``USE_VERSION=1_0`` - the SparseVLM v1.5 path of the LLaVA-1.5 results;
``llava/model/language_model/modelling_sparse_llama.py`` ``LlamaDynamicvitModel.forward``,
``score.py`` ``attn_postprocess_topk``, ``utils.py`` ``cluster_and_merge``) does it.

Raters, once per request before decoder layer 0 (``text_raters``): from the LLM's input
embeddings, R = softmax over the text axis of (visual [N, D] @ text [T, D]^T), averaged over the
visual tokens -> [T]; the text tokens after the image whose value is strictly above the mean of
the T values rate the image at every stage. The text tokens are every token after the last
visual token (question and chat template).

Scores, in a stage: the softmax attention of the rater rows to the visual tokens, averaged over
heads and over raters (``rater_scores``). The official code prunes the *output* of decoder layer
L with layer L's attention (pruning_loc = 2, 6, 15); here a stage ``layer=K`` reads layer K-1's
attention and prunes what enters layer K, so the official layer L is ``layer=L+1``: the default
layer is 3, and the official schedule reads ``sparsevlm:layer=3,...;sparsevlm:layer=7,...;
sparsevlm:layer=16,...``.

Recycling (``recycle_split``, ``dpc_knn``): of the m tokens the top-k drops, the
int(pool * m) + 1 best by score (pool = 0.3) are clustered by DPC-KNN on the stage's hidden
states into c = int(recycle * that) + 1 tokens (recycle = 0.1, i.e. /10): distances
||x_i - x_j|| / sqrt(D); density exp(-mean of the c smallest squared distances, self included);
delta = distance to the nearest denser token (the largest distance of the set for the densest);
centres = the c largest delta * density; every pooled token joins its nearest centre (a centre
its own); a cluster token is the plain mean of its members. The official code adds the c tokens
on top of its top-k count; here ``keep`` is the total, split into the largest top-k count k with
k + c(N - k) = keep (the official run with top-k k yields exactly ``keep`` tokens). Official
(LLaVA-1.5, 576 tokens) top-k counts per stage and our totals: 192: 300/200/110 -> keep
309/204/113; 128: 303/110/36 -> 312/117/39; 96: 238/48/26 -> 249/55/27; 64: 66/30/17 -> 82/32/18.

Remaining differences (the engine's layout): the official code appends the cluster tokens after
the kept visual tokens (centre-score order) and renumbers every position id contiguously after
each stage; here a cluster token takes its centre's slot and original position id, and every
token keeps its original position id (as SparseVLM+ "keep position id" does). The official
density gets 1e-6 uniform noise (torch.rand) to break ties; here ties break by order (the same
result whenever the densities differ), and a cluster mean divides by the count, not count + 1e-6.
A budget below what recycling can reach (keep < c(N)) keeps the top ``keep`` without recycling;
``recycle=0`` turns recycling off. With no rater above the mean (one text token), all text rows rate.
"""
from __future__ import annotations

import torch

from .base import Pruner, Selection, Signals, StageInput, topk_sorted
from .merge import merge_groups
from .options import Option


def text_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """visual [N, D], text [T, D] input embeddings -> [T] bool: relevance to the image above the mean."""
    if visual.shape[0] == 0:
        return torch.ones(text.shape[0], dtype=torch.bool, device=text.device)
    rel = (visual.float() @ text.float().T).softmax(dim=-1).mean(dim=0)  # [N, T] -> [T]
    return rel > rel.mean()


def rater_scores(text_attn: torch.Tensor, raters: torch.Tensor | None) -> torch.Tensor:
    """text_attn [H, T, N], raters [T] bool or None (every row) -> [N] head- and rater-mean attention."""
    rows = text_attn.float().mean(dim=0)  # [T, N]
    if raters is not None and bool(raters.any()):
        rows = rows[raters.to(rows.device)]
    return rows.mean(dim=0)


def recycle_counts(n_pruned: int, pool: float, recycle: float) -> tuple[int, int]:
    """(pooled, clusters) for n_pruned tokens dropped by the top-k: int(pool m) + 1, int(recycle p) + 1."""
    n_pool = min(int(n_pruned * pool) + 1, n_pruned)
    return n_pool, min(int(n_pool * recycle) + 1, n_pool)


def recycle_split(n: int, keep: int, pool: float, recycle: float) -> tuple[int, int, int]:
    """(top-k, pooled, clusters) with top-k + clusters == keep: the largest top-k that gets there;
    (keep, 0, 0) when recycling is off or the budget is below the clusters it would add."""
    if recycle > 0 and keep < n:
        for k in range(keep - 1, -1, -1):
            n_pool, c = recycle_counts(n - k, pool, recycle)
            if k + c == keep:
                return k, n_pool, c
            if k + c < keep:
                break
    return keep, 0, 0


def dpc_knn(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN of x [P, D] into c clusters -> (centres [c] indices into x in centre-score order,
    cluster [P] the position in ``centres`` each token joins)."""
    x = x.float()
    dist = torch.cdist(x, x) / x.shape[1] ** 0.5  # [P, P]
    density = (-(dist.topk(c, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()  # [P]
    denser = density[None, :] > density[:, None]  # [P, P]: token j denser than token i
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values  # [P]
    centres = torch.topk(delta * density, c).indices  # [c]
    cluster = dist[centres].argmin(dim=0)  # [P]
    cluster[centres] = torch.arange(c, device=x.device)
    return centres, cluster


class SparseVLMPruner(Pruner):
    name = "sparsevlm"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("llm",)
    default_where = "llm"
    default_layer = 3  # the official first stage, layer 2's output = what enters layer 3
    options = {"pool": Option("float", "share of the tokens the top-k drops that are recycled, best scores "
                                       "first (int(pool * dropped) + 1; official 0.3)", 0.3, low=0, high=1),
               "recycle": Option("float", "cluster tokens per recycled token (int(recycle * pooled) + 1; "
                                          "official 0.1); 0: no recycling, plain top-k", 0.1, low=0, high=1)}
    signals = Signals("llm.text_rows", "llm.text_raters")

    def text_raters(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return text_raters(visual, text)

    def select(self, inp: StageInput) -> Selection:
        n = inp.tokens.shape[0]
        scores = rater_scores(inp.text_attn, inp.raters)
        k, n_pool, c = recycle_split(n, inp.keep, self.option(inp.options, "pool"), self.option(inp.options, "recycle"))
        top = topk_sorted(scores, k)
        if c == 0:
            return Selection(keep_idx=top, scores=scores)
        dropped = torch.ones(n, dtype=torch.bool, device=scores.device)
        dropped[top] = False
        dropped = dropped.nonzero().flatten()
        pooled = dropped[torch.topk(scores[dropped], n_pool).indices]  # best first, as the official order
        centres, cluster = dpc_knn(inp.tokens[pooled], c)
        keep_idx = torch.cat([top, pooled[centres]]).sort().values
        groups = torch.full((n,), -1, dtype=torch.long, device=scores.device)
        groups[keep_idx] = torch.arange(keep_idx.numel(), device=scores.device)
        groups[pooled] = torch.searchsorted(keep_idx, pooled[centres])[cluster.to(scores.device)]
        tokens, groups = merge_groups(inp.tokens, keep_idx, groups)
        return Selection(keep_idx=keep_idx, scores=scores, tokens=tokens, groups=groups)

"""`prunevid`: PruneVid (Huang et al., ACL 2025, "PruneVid: Visual Token Pruning for Efficient Video Large
Language Models"): spatial-temporal token merging before the LLM, question-guided selection in it.

Transcribed from the official code, Visual-AI/PruneVid ``models/pllava/modeling_pllava.py``
(``PllavaForConditionalGeneration.merge_frames_dynamic`` with ``cluster_dpc_knn``, ``refine_clusters``,
``segment_lengths``, ``spatial_merge_tokens`` / ``compute_cluster_vectors``), called by ``forward`` on the
projected, pooled frame features [T * L, D] with ``threshold=config.tau`` and k = 7; the defaults of
``scripts/eval.sh`` / README: tau = 0.8, temporal_segment_ratio = 0.25, cluster_ratio = 0.5. It reads no
attention. The steps (T frames of L tokens, x [T, L, D]):

1. temporal segments: ``cluster_dpc_knn`` of the frames' mean features x.mean(1) [T, D] into
   int(T * temporal_segment_ratio) clusters with k = 7 neighbours; ``refine_clusters`` makes each cluster
   one run of frames (a cluster keeps its longest run(s); clusters whose runs are all single frames and the
   shorter runs are relabelled, left to right, by the neighbour whose run is longer, ties to the left);
   the segments are the runs of equal labels (``segment_lengths``).
2. static / dynamic, per segment of W frames: position l is static when the mean cosine over the frame
   pairs, ((sum_w sum_t cos(x_w,l, x_t,l)) - W) / (W (W - 1)), exceeds tau. The static positions' tokens are
   averaged over the W frames (one token a position); the dynamic ones stay per frame.
3. spatial merge: each group (the segment's static tokens; each frame's dynamic tokens) of n > 14 tokens is
   clustered by ``cluster_dpc_knn`` (DPC-kNN: d_ij = ||x_i - x_j|| / sqrt(D), torch.cdist; density
   exp(-mean of d^2 to its k = 7 nearest, itself included); delta = distance to the nearest denser token,
   the largest distance of the group for the densest; the int(n * cluster_ratio) highest delta * density
   are the centres; every token joins its nearest centre, a centre itself) and each cluster becomes the
   mean of its tokens. On 8 - 16 frames this keeps 28 - 37 % of the tokens: no budget parameter.

Budget, our mapping:
- ``keep=auto`` (the pruner is ``adaptive``): the official counts, int(n * cluster_ratio) for each group of
  n > ``min_cluster`` (14) tokens, n otherwise.
- numeric ``keep`` (the stage's total, met exactly): tokens outside the video's frame grids (still images,
  ``frames == -1``, and tokens off a frame's full grid such as OneVision's newline after the last frame) are
  always kept; the rest, K, goes to the groups: K <= O (O = the official total) splits K over the groups in
  proportion to their official counts (largest remainder, ``grid.split_budget``), so K = O is the official
  result; O < K <= M (M = the groups' token count without spatial merging) gives each group its official
  count plus a share of K - O in proportion to its unmerged rest; K > M merges nothing spatially and
  releases static tokens from their temporal mean: the static positions of lowest pair similarity first
  (then segment, then position), one later frame at a time, each released token kept at its own slot and
  the position's mean taken over the frames not released. A group given 0 tokens drops.

Where a merged token sits (the engine keeps original positions): a cluster at its centre token's slot,
a static token (or static cluster) at its position in the segment's first frame. The official code
writes them in the order [static clusters by centre score, then each frame's dynamic clusters] per segment
and numbers the positions contiguously; here they stay in sequence (slot) order.

Other choices:
- no random jitter on the densities (the official adds rand * 1e-6, so its own runs can differ where two
  densities tie); ties go to the lower index;
- k (``knn``) is clamped to the group's size and the segment clusters to >= 1 (the official raises for
  T < 7 frames, or int(T * ratio) = 0); a one-frame segment (T = 1) has no static positions (the official
  divides by W (W - 1) = 0);
- computed in float32 (the official runs in the model's dtype, bf16 on GPU);
- ``keep=auto`` whose counts are all 0 (cluster_ratio near 0) keeps one cluster of the largest group;
- frames are the request's video frames in index order; a frame's grid position is its token's rank in the
  frame; frames of unequal size compare their common first positions, the rest being dynamic; without a
  video each image / tile (``coords[:, 0]``) is a frame.

The LLM stage (``where=llm``, default layer 11 on a 32-layer LLM): PruneVid's second step, question-guided
selection, from ``models/pllava/elastic_cache.py::VTPWindowCache`` (``process_attention``, ``prompt_prefill``)
as ``models/pllava/llama.py``'s decoder loop calls it after layer ``selected_layer`` = 10 with alpha = 0.4:
that layer's attention computed without RoPE and without the causal mask (``attn_weights_wo_pos`` in
``LlamaAttention.forward``: softmax of q k^T / sqrt(d) over every key), its rows after the video (the question,
the template and the answer prefix), the max over heads, then over those rows, one score a visual token; per
segment the top int(alpha * n) of its static tokens and of each frame's dynamic tokens are kept (the hidden
states, the mask, the positions and the KV cache of layers 0 .. 10 are gathered to them). Here: the signal
``llm.text_rows_full`` (those rows, RoPE removed, every valid key; recorded in layer K-1) and ``video.spans``
(the first and last frame of the original tokens each token stands for: a token spanning more than one frame is
a static token of the segment it spans; the merge stage's partition, read from the engine's merge bookkeeping).
``keep=auto``: the official counts; a numeric ``keep`` is split over the groups as in the merge stage
(``budget_counts``). Differences: the engine keeps layers < K's caches whole during decoding (the official
gathers layers 0 .. 10's caches too); scores in float32 (the official: the model's dtype); ties to the lower
index; tokens without a frame (images of the request) are one group per image, at the same alpha; without a
merge stage before it every token is a dynamic token of its frame; keep=auto on groups all too small keeps the
best token.

Checked against a transcription of ``merge_frames_dynamic`` at 8 / 12 / 16 x 196 tokens and tiny geometry, and
through the engine (tests/test_official_prunevid.py): the kept sets are the official ones, the merged
features within 1e-5; the LLM stage against ``process_attention`` on fixed rows and, through the engine, on
rows recomputed from the hidden states entering the layer (tiny LLaVA and Qwen2-VL videos).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput
from .grid import lattice, split_budget
from .options import Option
from .vidcom2 import split_layout


def dpc_knn(x: torch.Tensor, n_centres: int, knn: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, D] -> (centres [c] indices into x, highest delta * density first (ties: lower index);
    assign [M] the cluster 0..c-1 of each token, nearest centre, a centre in its own)."""
    m, d = x.shape
    xf = x.float()[None]
    dist = (torch.cdist(xf, xf) / d ** 0.5)[0]
    near = dist.topk(min(knn, m), dim=-1, largest=False).values
    density = (-(near ** 2).mean(dim=-1)).exp()
    denser = (density[None, :] > density[:, None]).float()
    delta = (dist * denser + dist.max() * (1 - denser)).min(dim=-1).values
    centres = torch.sort(delta * density, descending=True, stable=True).indices[:n_centres]
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(centres.numel(), device=x.device)
    return centres, assign


def _runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """[(label, start, end)] maximal runs of equal labels, end exclusive."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            out.append((labels[start], start, i))
            start = i
    return out


def refine_labels(labels: list[int]) -> list[int]:
    """[T] frame cluster labels -> [T] each cluster one run (``refine_clusters``, see the module docstring)."""
    n, out = len(labels), list(labels)
    for lab in sorted(set(labels)):
        runs = [(s, e) for v, s, e in _runs(labels) if v == lab]
        longest = max(e - s for s, e in runs)
        for s, e in runs:
            if longest == 1 or e - s < longest:
                out[s:e] = [-1] * (e - s)
    i = 0
    while i < n:
        if out[i] != -1:
            i += 1
            continue
        start = i
        while i < n and out[i] == -1:
            i += 1
        left = right = None
        left_len = right_len = 0
        if start > 0:
            left, j = out[start - 1], start - 1
            while j >= 0 and out[j] == left:
                j -= 1
            left_len = start - 1 - j
        if i < n:
            right, j = out[i], i
            while j < n and out[j] == right:
                j += 1
            right_len = j - i
        new = left if left_len > right_len else right if right_len > left_len else (left if left is not None else right)
        out[start:i] = [0 if new is None else new] * (i - start)
    return out


def temporal_segments(frame_feats: torch.Tensor, ratio: float = 0.25, knn: int = 7) -> list[tuple[int, int]]:
    """frame_feats [T, D] (each frame's mean token) -> segments [(start, end)], end exclusive, in order."""
    t = frame_feats.shape[0]
    if t <= 1:
        return [(0, t)]
    _, assign = dpc_knn(frame_feats, max(1, int(t * ratio)), knn)
    return [(s, e) for _, s, e in _runs(refine_labels(assign.tolist()))]


def pair_similarity(window: torch.Tensor) -> torch.Tensor:
    """window [W, L, D] -> [L] mean cosine of position l over the W (W - 1) ordered frame pairs (W >= 2)."""
    w = window.shape[0]
    xn = F.normalize(window.float(), p=2, dim=-1)
    sim = torch.einsum("wlc,tlc->wtl", xn, xn)
    return (sim.sum(dim=-2) - 1).sum(dim=-2) / (w * (w - 1))


def official_count(n: int, ratio: float, min_cluster: int) -> int:
    """Tokens the official merge leaves of a group of n: int(n * ratio) when n > min_cluster, else n."""
    return int(n * ratio) if n > min_cluster else n


class _Group:
    """One spatial-merge unit: feats [n, D] float32, slots [n] (token index where each sits), members [n]
    lists of the token indices each stands for, sim [n] pair similarity (static) or None (dynamic)."""

    def __init__(self, feats, slots, members, sim=None):
        self.feats, self.slots, self.members, self.sim = feats, slots, members, sim


def build_groups(x: torch.Tensor, members: list[torch.Tensor], segments, tau: float) -> list[_Group]:
    """x [N, D] float32, frames' token indices, segments -> groups in official order: per segment its
    static group, then each frame's dynamic group."""
    groups = []
    for a, b in segments:
        frames = members[a:b]
        common = min(m.numel() for m in frames)
        win = torch.stack([x[m[:common]] for m in frames])  # [W, L, D]
        pair = pair_similarity(win) if b - a >= 2 else torch.full((common,), float("-inf"))
        static = pair > tau
        pos = static.nonzero().flatten()
        sim = pair[pos] if b - a >= 2 else None
        groups.append(_Group(win[:, pos].mean(dim=0), frames[0][pos],
                             [[int(m[p]) for m in frames] for p in pos.tolist()], sim))
        dyn = (~static).nonzero().flatten()
        for m in frames:
            idx = torch.cat([m[dyn], m[common:]])
            groups.append(_Group(x[idx], idx, [[int(i)] for i in idx]))
    return groups


def budget_counts(sizes: list[int], off: list[int], keep: int | None) -> list[int]:
    """Tokens each group keeps: the official counts ``off`` (keep None); else keep <= sum(off) split over
    the groups in proportion to ``off``, past it each group's official count plus a share of the rest in
    proportion to its size - off (largest remainder; capped at the sizes)."""
    if keep is None:
        return list(off)
    if keep <= sum(off):
        return split_budget(off, keep) if sum(off) else list(off)
    rest = [n - o for n, o in zip(sizes, off)]
    extra = min(keep, sum(sizes)) - sum(off)
    if extra <= 0:  # every group already whole (a merge stage past M: ``release`` does the rest)
        return list(off)
    return [o + e for o, e in zip(off, split_budget(rest, extra))]


def group_counts(groups: list[_Group], keep_v: int | None, ratio: float, min_cluster: int) -> list[int]:
    """Tokens each merge group keeps (``budget_counts`` of the official counts; K > M: ``release``)."""
    sizes = [g.feats.shape[0] for g in groups]
    return budget_counts(sizes, [official_count(n, ratio, min_cluster) for n in sizes], keep_v)


def release(groups: list[_Group], extra: int) -> list[int]:
    """Unmerge ``extra`` static tokens (least similar positions first, one later frame at a time): they are
    removed from their group's members and returned, each to be kept at its own slot."""
    cands = [(float(g.sim[i]), gi, i) for gi, g in enumerate(groups) if g.sim is not None for i in range(len(g.sim))]
    out = []
    for _, gi, i in sorted(cands):
        while extra and len(groups[gi].members[i]) > 1:
            out.append(groups[gi].members[i].pop(1))
            extra -= 1
    return out


def merge_group(g: _Group, count: int, knn: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """-> (slots [c], merged feats [c, D], members of each kept token) for a group keeping ``count``."""
    n = g.feats.shape[0]
    if count >= n:
        return g.slots, g.feats, g.members
    if count <= 0:
        return g.slots[:0], g.feats[:0], []
    centres, assign = dpc_knn(g.feats, count, knn)
    sums = torch.zeros(count, g.feats.shape[1]).index_add_(0, assign, g.feats)
    feats = sums / torch.bincount(assign, minlength=count).clamp_min(1)[:, None].float()
    members = [[] for _ in range(count)]
    for i, c in enumerate(assign.tolist()):
        members[c].extend(g.members[i])
    return g.slots[centres], feats, members


def prunevid_merge(tokens: torch.Tensor, frames: torch.Tensor, coords: torch.Tensor, keep: int | None,
                   tau: float = 0.8, segment_ratio: float = 0.25, cluster_ratio: float = 0.5, knn: int = 7,
                   min_cluster: int = 14):
    """tokens [N, D], frames [N] (-1: still image), coords [N, 3], keep (None: the official counts)
    -> (keep_idx [k] sorted, merged tokens [k, D] in tokens' dtype, groups [N]). Pure, deterministic."""
    n, dev = tokens.shape[0], tokens.device
    members, fixed = split_layout(frames, coords)
    if not members or (keep is not None and keep <= fixed.numel()):
        kept = fixed if keep is None or keep >= fixed.numel() else fixed[lattice(coords[fixed.to(coords.device)].cpu(), keep)]
        kept = kept.sort().values
        groups = torch.full((n,), -1, dtype=torch.long)
        groups[kept] = torch.arange(kept.numel())
        return kept.to(dev), tokens[kept.to(dev)].clone(), groups.to(dev)
    x = tokens.detach().float().cpu()
    feats = torch.stack([x[m].mean(dim=0) for m in members]) if len({m.numel() for m in members}) > 1 else \
        x[torch.cat(members)].view(len(members), -1, x.shape[1]).mean(dim=1)
    groups = build_groups(x, members, temporal_segments(feats, segment_ratio, knn), tau)
    keep_v = None if keep is None else keep - fixed.numel()
    counts = group_counts(groups, keep_v, cluster_ratio, min_cluster)
    if keep_v is None and sum(counts) == 0 and not fixed.numel():  # keep=auto at a tiny ratio: never empty
        counts[max(range(len(groups)), key=lambda i: groups[i].feats.shape[0])] = 1
    own = release(groups, keep_v - sum(counts)) if keep_v is not None and keep_v > sum(counts) else []
    slots, rows, owners = [fixed, torch.tensor(own, dtype=torch.long)], [x[fixed], x[own]], \
        [[[int(i)] for i in fixed], [[i] for i in own]]
    for g, c in zip(groups, counts):
        if own and g.sim is not None and g.members:  # released frames: the mean over the frames left
            g.feats = torch.stack([x[m].mean(dim=0) for m in g.members])
        s, f, mem = merge_group(g, c, knn)
        slots.append(s)
        rows.append(f)
        owners.append(mem)
    slot = torch.cat(slots)
    order = slot.argsort()
    kept = slot[order]
    flat = [m for part in owners for m in part]
    out = torch.cat(rows)[order].to(tokens.dtype).to(dev)
    groups_out = torch.full((n,), -1, dtype=torch.long)
    for q, i in enumerate(order.tolist()):
        groups_out[flat[i]] = q
    return kept.to(dev), out, groups_out.to(dev)


def selection_groups(spans: torch.Tensor | None, coords: torch.Tensor) -> list[torch.Tensor]:
    """[N, 2] spans (None: no merge bookkeeping), coords [N, 3] -> token indices of each selection group:
    each segment's static tokens (span over > 1 frame), each frame's dynamic tokens, each image's tokens."""
    n = coords.shape[0]
    if spans is None:
        spans = torch.full((n, 2), -1, dtype=torch.long)
    spans, item = spans.cpu(), coords[:, 0].cpu()
    key = [("s", int(a), int(b)) if b > a else ("d", int(a), 0) if a >= 0 else ("i", int(i), 0)
           for (a, b), i in zip(spans.tolist(), item.tolist())]
    order = {k: j for j, k in enumerate(sorted(set(key)))}
    gid = torch.tensor([order[k] for k in key], dtype=torch.long)
    return [(gid == j).nonzero().flatten() for j in range(len(order))]


def prunevid_select(text_attn: torch.Tensor, spans: torch.Tensor | None, coords: torch.Tensor, keep: int | None,
                    alpha: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """text_attn [H, T, N] (rows after the video, RoPE removed, no causal mask), spans [N, 2], coords [N, 3],
    keep (None: the official counts int(alpha * n) of each group) -> (keep_idx sorted, scores [N]: the max
    over heads and rows). Each group keeps its highest-scoring tokens (ties: lower index)."""
    scores = text_attn.float().amax(dim=(0, 1)).cpu()
    groups = selection_groups(spans, coords)
    sizes = [g.numel() for g in groups]
    counts = budget_counts(sizes, [int(n * alpha) for n in sizes], keep)
    if sum(counts) == 0:  # keep=auto on tiny groups: the best token, not an empty video
        return scores.argmax()[None].to(text_attn.device), scores.to(text_attn.device)
    kept = [g[torch.sort(scores[g], descending=True, stable=True).indices[:c]] for g, c in zip(groups, counts)]
    return torch.cat(kept).sort().values.to(text_attn.device), scores.to(text_attn.device)


class PruneVidPruner(Pruner):
    name = "prunevid"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    wheres = ("pre_llm", "llm")
    default_where = "pre_llm"
    default_layer = 11  # the official selected_layer = 10: its attention, pruned after it
    adaptive = True
    signals = Signals("llm.text_rows_full", "video.spans")
    options = {
        "tau": Option("float", "a position is static in a segment when its mean frame-pair cosine exceeds this",
                      0.8, low=-1, high=1),
        "segment_ratio": Option("float", "temporal segments: DPC-kNN of the frames into int(T * ratio) clusters",
                                0.25, low=0, high=1),
        "cluster_ratio": Option("float", "spatial merge: each group of n tokens into int(n * ratio) clusters "
                                         "(keep=auto; a numeric keep rescales)", 0.5, low=0, high=1),
        "knn": Option("int", "neighbours of the DPC-kNN density", 7, low=1),
        "min_cluster": Option("int", "groups of at most this many tokens are not merged spatially", 14, low=0),
        "alpha": Option("float", "LLM stage: share of each segment's static and each frame's dynamic tokens kept "
                                 "(keep=auto; a numeric keep rescales)", 0.4, low=0, high=1)}
    MERGE = ("tau", "segment_ratio", "cluster_ratio", "knn", "min_cluster")

    def select(self, inp: StageInput) -> Selection:
        o = inp.options
        video = inp.frames is not None and bool((inp.frames >= 0).any())
        frames = inp.frames if video else inp.coords[:, 0]
        if inp.text_attn is not None:  # the LLM stage: question-guided selection
            keep_idx, scores = prunevid_select(inp.text_attn, inp.spans, inp.coords, inp.keep, self.option(o, "alpha"))
            return Selection(keep_idx=keep_idx, scores=scores)
        if inp.keep == inp.tokens.shape[0]:  # keep-everything is the identity (engine contract)
            return Selection(keep_idx=torch.arange(inp.keep, device=inp.tokens.device))
        keep_idx, tokens, groups = prunevid_merge(inp.tokens, frames, inp.coords, inp.keep,
                                                  **{k: self.option(o, k) for k in self.MERGE})
        return Selection(keep_idx=keep_idx, tokens=tokens, groups=groups)

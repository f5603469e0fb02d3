"""`fastvid`: FastVID (Shen et al., 2025, "FastVID: Dynamic Density Pruning for Fast Video Large
Language Models").

Transcribed from the official code, LunarShen/FastVID
``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py`` (the block
"FastVID" in ``Qwen2Model.forward``, run on the LLM's input embeddings of the video), defaults of
``lmms-eval/lmms_eval/models/llava_onevision.py``: c = 8, tau = 0.9, d = 0.4, p = 4, beta = 0.6.

1. DySeg (``segment_frames``): s_t = cos(g_t, g_t+1) of consecutive frame features; the video is cut
   after frame t for the c - 1 lowest s_t and for every s_t < tau.
2. STPrune, per frame f with a retained budget R_f: salient part, the R_f - int(R_f * d) tokens of
   highest attention score (``cls_or_surrogate``: the tower's CLS attention, or the mean-query
   surrogate); context part, int(R_f * d) tokens, pooled over the segment and handed to its anchor
   frames (every p-th frame counted back from the segment's last one), each anchor getting an equal
   share.
3. Context selection (``density_peaks``, DPC-KNN) in each anchor frame over its non-salient tokens:
   d_ij = ||x_i - x_j|| / sqrt(D); density rho_i = exp(-mean of d^2 to its knn = 4 nearest, itself
   included); delta_i = distance to the nearest denser token (the densest: the largest distance
   of the frame); the top ``share`` of rho * delta are the anchor's context tokens.
4. DTM: every non-salient token of the segment (all its frames, the anchors' own included) is
   assigned to the most cosine-similar context token of an anchor; each context token becomes
   alpha * itself + (1 - alpha) * mean(assigned), alpha = max(1 / (count + 1), beta), count = the
   tokens assigned (itself included). As in the official code this is done per anchor frame, so in
   a segment with several anchors a token contributes to one context token of every anchor.

Budget, our mapping: the official code keeps int(0.10 * 196) = 19 tokens a frame (12 salient +
7 context). Here ``keep`` is the stage's total and is met exactly: tokens of still images
(``frames == -1``) are always kept (if ``keep`` is below them, an even lattice of them); the rest,
keep_v, is split over the frames by size (largest remainder) as R_f, so the retention ratio is
keep_v / N_v (0.10 reproduces the paper); salient/context per frame as above with ``d`` (default
0.4: 60/40); a segment's context share goes to its anchors in proportion to their non-salient
tokens (largest remainder, ties to the earlier anchor; the official gives each floor(C * L / anchors)
and drops the C * L mod anchors left, e.g. 35 = 17 + 17 + 1 for L = 5 at 196 tokens, so at keep = T x 19
the segment's first anchor keeps one density peak more than the official); what the anchors cannot
hold (short frames, high keep) becomes extra salient tokens of the segment's frames.

Other choices:
- frame features g_t: the official code uses SigLIP's attention-pooling head (its pooled output;
  the head's attention is also its salient score). Here g_t = the frame's tokens averaged with the
  salient scores as weights (the pooling form of that head, on the stage's tokens), unless
  ``frame_feats`` is given;
- no random jitter on the densities (the official adds rand * 1e-6); ties go to the lower index;
- merge groups record each merged token once: in the group of the context token it is most similar
  to among all of its segment's anchors (the features follow the official per-anchor merge; with
  one anchor, L <= p, the two agree); non-salient tokens of a segment without context tokens drop;
- frames are ranked by index; without ``frames`` (no video) the item index ``coords[:, 0]`` is the
  frame. LLaVA-OneVision's newline token (last frame) is an ordinary token of that frame here (the
  official block excludes it from ``video_token_len``: it is always kept, outside the budget);
- salient scores: the official reads SigLIP's attention-pooling head (its probe's attention over the
  27 x 27 patches, bilinearly pooled to 14 x 14 like the features); the transformers LLaVA-OneVision
  tower has no head (its config sets ``vision_use_head=False``: no head weights are loaded), so here
  the tower's CLS attention where there is one, else ``cls_or_surrogate``'s mean-query attention;
- an anchor whose official count C*L // anchors equals C (only with p = 1, or p = 2 and C = 1) is
  merged officially with its own frame's non-salient tokens only, and the segment's other frames' are
  dropped; here the segment's pool is merged as for any other anchor.
Equal-size frames with keep = T * int(n * ratio), and no remainder C*L % anchors, select and merge what
the official block does (tests/test_official_video.py, 8 x 64, 16 x 169 and 32 x 196 tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput, cls_or_surrogate
from .options import Option
from .dycoke import frame_members
from .grid import lattice, split_budget


def segment_frames(frame_feats: torch.Tensor, c: int = 8, tau: float = 0.9) -> list[tuple[int, int]]:
    """frame_feats [T, D] -> segments [(start, end)], end exclusive, covering 0..T-1 in order.

    Cuts after frame t for the c - 1 lowest consecutive cosines s_t (ties: lower t) and every s_t < tau.
    """
    t = frame_feats.shape[0]
    if t <= 1:
        return [(0, t)]
    g = F.normalize(frame_feats.float(), dim=-1)
    sim = (g[:-1] * g[1:]).sum(-1).cpu()
    lowest = torch.sort(sim, stable=True).indices[:max(0, min(c - 1, t - 1))].tolist()
    cuts = sorted(set(lowest) | set((sim < tau).nonzero().flatten().tolist()))
    bounds = [0] + [i + 1 for i in cuts] + [t]
    return list(zip(bounds[:-1], bounds[1:]))


def density_scores(x: torch.Tensor, knn: int = 4) -> torch.Tensor:
    """x [M, D] -> [M] DPC-KNN score rho * delta (see the module docstring)."""
    m = x.shape[0]
    x = x.float()
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[-1] ** 0.5
    near = dist.topk(min(knn, m), dim=-1, largest=False).values
    rho = torch.exp(-(near ** 2).mean(-1))
    denser = rho[None, :] > rho[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    return rho * delta


def density_peaks(x: torch.Tensor, k_centers: int, knn: int = 4) -> torch.Tensor:
    """x [M, D] -> [k] indices of the DPC-KNN centres, highest score first (ties: lower index)."""
    if k_centers <= 0 or x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.sort(density_scores(x, knn), descending=True, stable=True).indices[:k_centers]


def anchor_frames(start: int, end: int, p: int = 4) -> list[int]:
    """The anchor frames of segment [start, end): its last frame and every p-th one before it."""
    return [j for j in range(start, end) if (end - 1 - j) % p == 0]


def fastvid_budget(sizes: list[int], segments: list[tuple[int, int]], keep: int, d: float = 0.4,
                   p: int = 4) -> tuple[list[int], list[int]]:
    """Per frame (salient count, context count); sum of both == min(keep, sum(sizes)) exactly."""
    retain = split_budget(sizes, keep) if sum(sizes) else [0] * len(sizes)
    salient = [r - int(r * d) for r in retain]
    context = [0] * len(sizes)
    for a, b in segments:
        share = sum(int(r * d) for r in retain[a:b])
        anchors = anchor_frames(a, b, p)
        room = [sizes[j] - salient[j] for j in anchors]
        alloc = split_budget(room, share) if share and sum(room) else [0] * len(anchors)
        for j, k in zip(anchors, alloc):
            context[j] = k
        excess = share - sum(alloc)
        if excess:  # the anchors are full: the rest as extra salient tokens of the segment
            room = [sizes[j] - salient[j] - context[j] for j in range(a, b)]
            for j, k in zip(range(a, b), split_budget(room, excess)):
                salient[j] += k
    return salient, context


def frame_features(tokens: torch.Tensor, members: list[torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
    """[T, D] each frame's tokens averaged with their (non-negative) scores as weights (plain mean if all 0)."""
    out = []
    for m in members:
        w = scores[m].float().clamp_min(0)
        w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / m.numel())
        out.append((tokens[m].float() * w[:, None]).sum(0))
    return torch.stack(out)


def fastvid_select(tokens: torch.Tensor, frames: torch.Tensor, scores: torch.Tensor, keep: int, c: int = 8,
                   tau: float = 0.9, d: float = 0.4, p: int = 4, beta: float = 0.6, knn: int = 4,
                   frame_feats: torch.Tensor | None = None, coords: torch.Tensor | None = None):
    """tokens [N, D], frames [N] (-1: still image), scores [N] salient scores, keep
    -> (keep_idx [keep] sorted, merged tokens [keep, D] in tokens' dtype, groups [N]).

    frame_feats [T, D]: the frames' global features for DySeg (default ``frame_features``);
    coords [N, 3]: only to thin the image tokens when ``keep`` is below them. Pure, deterministic.
    """
    dev, n = tokens.device, tokens.shape[0]
    frames = frames.cpu().long()
    scores = scores.float().cpu()
    members = frame_members(frames)
    images = (frames < 0).nonzero().flatten()
    groups = torch.full((n,), -1, dtype=torch.long)
    new = {}  # kept index -> merged feature
    if keep <= images.numel():
        if keep < images.numel():
            pos = lattice(coords[images.to(coords.device)].cpu(), keep) if coords is not None else \
                ((torch.arange(keep) + 0.5) * images.numel() / keep).long()
            images = images[pos]
        kept = images.sort().values
    else:
        feats = frame_feats if frame_feats is not None else frame_features(tokens, members, scores.to(dev))
        segments = segment_frames(feats, c, tau)
        salient_n, context_n = fastvid_budget([m.numel() for m in members], segments, keep - images.numel(), d, p)
        x = tokens.float()
        xn = F.normalize(x, dim=-1)
        salient, rest = [], []
        for m, k in zip(members, salient_n):
            order = torch.sort(scores[m], descending=True, stable=True).indices
            salient.append(m[order[:k]])
            rest.append(m[order[k:]].sort().values)
        kept_parts = [images] + salient
        for a, b in segments:
            pool = torch.cat(rest[a:b])  # the segment's non-salient tokens
            targets = []
            for j in anchor_frames(a, b, p):
                if context_n[j] == 0:
                    continue
                cand = rest[j]
                t = cand[density_peaks(x[cand.to(dev)], context_n[j], knn).cpu()]
                sim = xn[pool.to(dev)] @ xn[t.to(dev)].T
                to = sim.argmax(1)
                count = torch.bincount(to, minlength=t.numel()).float()
                mean = torch.zeros(t.numel(), x.shape[1], device=dev).index_add_(0, to, x[pool.to(dev)])
                mean = mean / count.clamp_min(1)[:, None]
                alpha = (1 / (count + 1)).clamp(min=beta)
                xt = x[t.to(dev)]
                merged = torch.where(count[:, None] > 0, xt + (1 - alpha)[:, None] * (mean - xt), xt)
                for i, v in zip(t.tolist(), merged):
                    new[i] = v
                targets.append(t)
            if targets:
                t = torch.cat(targets)
                best = t[(xn[pool.to(dev)] @ xn[t.to(dev)].T).argmax(1).cpu()]
                groups[pool] = best  # an index for now, a position below
                kept_parts.append(t)
        kept = torch.cat(kept_parts).sort().values
    pos = torch.full((n,), -1, dtype=torch.long)
    pos[kept] = torch.arange(kept.numel())
    groups = torch.where(groups >= 0, pos[groups.clamp_min(0)], -1)
    groups[kept] = torch.arange(kept.numel())
    out = tokens[kept.to(dev)].clone()
    for i, v in new.items():
        out[int(pos[i])] = v.to(tokens.dtype)
    return kept.to(dev), out, groups.to(dev)


class FastVIDPruner(Pruner):
    name = "fastvid"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("pre_llm",)
    default_where = "pre_llm"
    options = {
        "c": Option("int", "segments: cuts at the c-1 lowest consecutive-frame similarities", 8, low=1),
        "tau": Option("float", "also cut wherever consecutive frames are less similar than this", 0.9, low=-1, high=1),
        "d": Option("float", "share of a segment's budget for its context (density-peak) tokens", 0.4, low=0, high=1),
        "p": Option("int", "anchor frames every p frames for the context tokens", 4, low=1),
        "beta": Option("float", "weight of a merged token's own features (alpha = max(1/(count+1), beta))", 0.6,
                       low=0, high=1),
        "knn": Option("int", "neighbours of the density estimate", 4, low=1)}
    signals = Signals("tower.cls")

    def select(self, inp: StageInput) -> Selection:
        o = inp.options
        frames = inp.frames if inp.frames is not None else inp.coords[:, 0]
        scores = cls_or_surrogate(inp)
        keep_idx, tokens, groups = fastvid_select(
            inp.tokens, frames, scores, inp.keep, **{k: self.option(o, k) for k in self.options}, coords=inp.coords)
        return Selection(keep_idx=keep_idx, scores=scores, tokens=tokens, groups=groups)

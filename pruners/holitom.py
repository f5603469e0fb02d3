"""`holitom`: HoliTom's outer stage (Shao et al., 2025, "HoliTom: Holistic Token Merging for Fast Video
Large Language Models"): temporal segmentation, static-token merging across a window, attention-guided
merging within each frame. Run before the LLM on a video's projected, pooled frame features.

Transcribed from the official code, cokeshao/HoliTom ``holitom/llava_arch.py``
(``LlavaMetaForCausalLM_holitom.prepare_inputs_labels_for_multimodal``, its video branch, with
``select_static_windows``, ``get_static_dynamic_features``, ``holitom``, ``merge_tokens_by_attention_density``,
``merge_tokens_by_density``, ``cluster_dpc_knn``, ``merge_tokens_by_clustering``); the attention is
``LLaVA-NeXT/llava/model/multimodal_encoder/siglip_encoder.py::SigLipVisionTower.forward`` (WRAPPER=holitom):
the last kept SigLIP layer's attention (the feature layer), ``attentions[-1].mean(dim=1).mean(dim=1)``: the
attention each token RECEIVES, averaged over heads and over all query rows, pooled to the frame grid by
``get_2dPool`` like the features. Defaults (env, ``scripts/eval_ov-7b_holitom.sh``): RETAIN_RATIO r, T = tau
0.8 (0.65 at r = 0.10), BETA 0.6, D 0, K 7, MAX_WINDOW_SIZE 1024. The steps (T frames of n tokens, x [T, n, D]):

1. ``feature_sim`` [T-1, n]: cosine of each token with the same position in the next frame;
2. ``select_static_windows``: a dynamic programme over windows [s, e] (up to ``max_window`` frames) maximising
   the tokens saved, static(s, e) * (e - s), static(s, e) = positions whose similarity exceeds tau between every
   pair of consecutive frames of the window; ties keep the shorter choice (strict ``>``, sizes ascending);
3. the ratio is raised for what the windows saved: r' = min(r / ((T n - saved) / (T n)), 1);
4. per window: its static positions averaged over its frames (``static_feat.mean(dim=0)``), then merged by
   ``merge_tokens_by_density``: round(n_s r') DPC-kNN centres (d_ij = ||x_i - x_j|| / sqrt(D), density
   exp(-mean d^2 to the min(K, centres) nearest, itself included), score density * distance to the nearest
   denser token), every other static token joins its nearest centre, a centre with members becomes
   beta * centre + (1 - beta) * mean(members) (env NO_BETA unset: the beta branch);
5. per frame (a window's frames, or a lone frame): its dynamic positions, ceil(n_d r') tokens of which
   round(ceil(n_d r') (1 - D)) "dominant" (highest received attention) and the rest "contextual" (DPC-kNN centres
   among the non-dominant, merged as in 4). With D = 0 (default) a frame keeps its top-attention tokens.
HoliTom rounds per frame (ceil) and per window (round), so its total is not r * T * n.

Where a merged token sits: a window's static centre at the window's FIRST frame, at the centre's position (the
official LLaVA-Video "grid" layout; its LLaVA-OneVision "one_token" layout puts a segment's static tokens
before the segment's frames and each frame's dominant tokens before its contextual ones: here every kept token
keeps its original sequence place). ``groups``: every frame's copy of a static position joins its centre.

Budget, our mapping: ``keep`` is the stage's total and is met exactly. Tokens outside the frame grids (still
images, a token off the full grid such as OneVision's newline: ``vidcom2.split_layout``) are always kept; the
rest, keep_v, is met by the official per-unit counts (windows' round(n_s q), frames' ceil(n_d q)) at a ratio q
found by bisection; each count is non-decreasing in q, so every q that keeps exactly keep_v gives the official
counts: keep = ``official_keep(.., ratio=r)`` reproduces RETAIN_RATIO = r. Where no q hits keep_v (several
units step up at once), the units in sequence order (window by window, static first) take the remaining
tokens. keep_v above what the windows leave at q = 1: no windows (every frame its own segment).

Other choices: float32 throughout (the official: the model dtype, bf16); no random jitter on the densities (the
official adds rand * 1e-6) and ties go to the lower position (the official ``topk`` leaves them open); frames
are the request's video frames by index (without a video, each image / tile is one frame); frames of unequal
size or grid get no windows. The received attention is the signal ``tower.received`` at the feature layer
(``tower_score``; required: the stage is refused on the Qwen families, whose towers tokensieve does not hook;
called directly without it, the mean-query surrogate of ``cls_or_surrogate``).
HoliTom's inner-LLM merge (``holitom/modeling_qwen2.py``, HOLITOM_k / HOLITOM_r) is the pruner ``holitom_llm``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput, TowerRecord, cls_or_surrogate
from .grid import lattice
from .options import Option
from .vidcom2 import split_layout


def static_windows(over: torch.Tensor, max_window: int = 1024) -> list[tuple[int, int]]:
    """over [T-1, n] bool (similarity above tau) -> windows [(s, e)] inclusive, covering 0..T-1 in order:
    the official dynamic programme (saved tokens static(s, e) * (e - s); ties: the shorter choice)."""
    t = over.shape[0] + 1
    saved = [[0] * t for _ in range(t)]
    for s in range(t - 1):
        run = torch.cumprod(over[s:].long(), dim=0).sum(-1).tolist()  # static(s, s + 1 + j)
        for j, c in enumerate(run):
            saved[s][s + 1 + j] = c * (1 + j)
    dp, prev = [0] * t, [0] * t
    for i in range(t):
        best, arg = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            val = (dp[j] if j >= 0 else 0) + saved[j + 1][i]
            if val > best:
                best, arg = val, j + 1
        dp[i], prev[i] = best, arg
    out, i = [], t - 1
    while i >= 0:
        out.append((prev[i], i))
        i = prev[i] - 1
    return out[::-1]


def density_centres(x: torch.Tensor, k: int, knn: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, D] -> (the k DPC-kNN centres [k] ascending, distances [M, M]); density over min(knn, k) nearest."""
    dist = torch.cdist(x.float(), x.float()) / x.shape[-1] ** 0.5
    near = dist.topk(min(knn, k), dim=-1, largest=False).values
    rho = torch.exp(-(near ** 2).mean(-1))
    denser = rho[None, :] > rho[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    order = torch.sort(delta * rho, descending=True, stable=True).indices
    return order[:k].sort().values, dist


def cluster_merge(x: torch.Tensor, centres: torch.Tensor, dist: torch.Tensor, beta: float = 0.6):
    """x [M, D], centres [k], dist [M, M] -> (merged [k, D], owner [M]: the centre (0..k-1) of each token).
    Every non-centre token joins its nearest centre (ties: the first); a centre with members becomes
    beta * itself + (1 - beta) * mean(members)."""
    m, k = x.shape[0], centres.numel()
    owner = dist[:, centres].argmin(-1)
    owner[centres] = torch.arange(k, device=x.device)
    is_member = torch.ones(m, dtype=torch.bool, device=x.device)
    is_member[centres] = False
    own = owner[is_member]
    count = torch.bincount(own, minlength=k).float()
    mean = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, own, x[is_member].float())
    mean = mean / count.clamp_min(1)[:, None]
    xc = x[centres].float()
    return torch.where(count[:, None] > 0, beta * xc + (1 - beta) * mean, xc), owner


def unit_count(kind: str, size: int, q: float) -> int:
    """Tokens a unit keeps at ratio q: a window's statics round(size q) (Python round), a frame ceil(size q)."""
    return round(size * q) if kind == "static" else math.ceil(size * q)


def units_of(over: torch.Tensor | None, t: int, n: int, max_window: int):
    """-> [(kind, frame, positions [m])]: per window its static positions (at its first frame), then each
    frame's dynamic positions, in sequence order; ``over`` None: every frame alone."""
    windows = static_windows(over, max_window) if over is not None and t > 1 else [(i, i) for i in range(t)]
    units, every = [], torch.arange(n)
    for s, e in windows:
        if s == e:
            units.append(("frame", s, every))
            continue
        static = over[s:e].all(0).cpu()
        units.append(("static", (s, e), every[static]))
        units += [("frame", f, every[~static]) for f in range(s, e + 1)]
    return units


def unit_counts(units, keep_v: int) -> list[int]:
    """[len(units)] counts summing to keep_v (<= the counts at q = 1): the official counts at a ratio q
    found by bisection; at a jump, the units in order take the remainder."""
    def counts(q):
        return [unit_count(kind, p.numel(), q) for kind, _, p in units]

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if sum(counts(mid)) < keep_v else (lo, mid)
    k_hi = counts(hi)
    if sum(k_hi) == keep_v:
        return k_hi
    k = counts(lo)
    need = keep_v - sum(k)
    for i, top in enumerate(k_hi):
        add = min(need, top - k[i])
        k[i] += add
        need -= add
    return k


def frame_keep(x: torch.Tensor, attn: torch.Tensor, total: int, d: float, beta: float, knn: int):
    """One frame's dynamic tokens x [m, D], attention [m], ``total`` kept -> (kept local [c] ascending,
    merged [c, D] in that order, owner [m]: position in the kept list, -1 dropped)."""
    m = x.shape[0]
    owner = torch.full((m,), -1, dtype=torch.long)
    dominant_n = round(total * (1 - d))
    dominant = torch.sort(attn.float().cpu(), descending=True, stable=True).indices[:dominant_n]
    kept, feats = [dominant], [x[dominant.to(x.device)].float()]
    rest = torch.ones(m, dtype=torch.bool)
    rest[dominant] = False
    rest = rest.nonzero().flatten()
    ctx = total - dominant_n
    if ctx > 0:
        centres, dist = density_centres(x[rest.to(x.device)], ctx, min(knn, ctx))
        merged, own = cluster_merge(x[rest.to(x.device)].float(), centres, dist, beta)
        kept.append(rest[centres.cpu()])
        feats.append(merged)
    kept_all = torch.cat(kept)
    order = torch.argsort(kept_all)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel())
    owner[dominant] = pos[:dominant_n]
    if ctx > 0:
        owner[rest] = pos[dominant_n:][own.cpu()]
    return kept_all[order], torch.cat(feats)[order.to(x.device)], owner


def holitom_select(tokens: torch.Tensor, frames: torch.Tensor, coords: torch.Tensor, attn: torch.Tensor, keep: int,
                   tau: float = 0.8, beta: float = 0.6, d: float = 0.0, knn: int = 7, max_window: int = 1024):
    """tokens [N, D], frames [N] (-1: still image), coords [N, 3], attn [N] received attention, keep
    -> (keep_idx [keep] sorted, merged tokens [keep, D] in tokens' dtype, groups [N]). Pure, deterministic."""
    dev, n_all = tokens.device, tokens.shape[0]
    members, fixed = split_layout(frames, coords)
    attn = attn.float().cpu()
    if keep <= fixed.numel() or not members:
        kept = fixed if keep >= fixed.numel() else fixed[lattice(coords[fixed.to(coords.device)].cpu(), keep)]
        return _finish(tokens, kept, {}, torch.full((n_all,), -1, dtype=torch.long))
    units = plan_units(tokens, members, coords, tau, max_window)
    keep_v = keep - fixed.numel()
    if sum(unit_count(k, p.numel(), 1.0) for k, _, p in units) < keep_v:
        units = plan_units(tokens, members, coords, None, max_window)
    counts = unit_counts(units, keep_v)
    new, groups, kept = {}, torch.full((n_all,), -1, dtype=torch.long), [fixed]
    for (kind, where, p), c in zip(units, counts):
        if kind == "frame":
            idx = members[where][p]
            local, feats, owner = frame_keep(tokens[idx.to(dev)], attn[idx], c, d, beta, knn)
            chosen = idx[local]
            if chosen.numel():
                groups[idx] = torch.where(owner >= 0, chosen[owner.clamp_min(0)], -1)
        else:
            s, e = where
            stack = torch.stack([members[f][p] for f in range(s, e + 1)])  # [W, m] token indices
            if c == 0:
                continue
            mean = tokens[stack.to(dev)].float().mean(0)
            centres, dist = density_centres(mean, c, min(knn, c))
            feats, own = cluster_merge(mean, centres, dist, beta)
            chosen = stack[0][centres.cpu()]
            groups[stack] = chosen[own.cpu()][None].expand_as(stack)
        kept.append(chosen)
        new.update(zip(chosen.tolist(), feats))
    return _finish(tokens, torch.cat(kept), new, groups)


def plan_units(tokens, members, coords, tau, max_window):
    """The units of ``units_of`` for these frames; no windows (tau None, or frames of unequal grids)."""
    t, n = len(members), members[0].numel()
    same = all(m.numel() == n for m in members) and all(
        torch.equal(coords[m.to(coords.device), 1:], coords[members[0].to(coords.device), 1:]) for m in members)
    if not same:
        return ragged_units(members)
    if tau is None or t < 2:
        return units_of(None, t, n, max_window)
    return units_of(static_over(tokens[torch.stack(members).to(tokens.device)], tau), t, n, max_window)


def static_over(x: torch.Tensor, tau: float) -> torch.Tensor:
    """x [T, n, D] frames -> [T-1, n] bool: cosine of each token with the same position in the next frame > tau."""
    x = F.normalize(x.float(), dim=-1)
    return (x[:-1] * x[1:]).sum(-1) > tau


def ragged_units(members):
    """Frames of unequal size: each frame one unit over all of its tokens."""
    return [("frame", f, torch.arange(m.numel())) for f, m in enumerate(members)]


def _finish(tokens, kept, new, groups):
    """-> (keep_idx sorted, tokens [k, D] with the merged features, groups as positions in keep_idx)."""
    kept = kept.sort().values
    pos = torch.full((tokens.shape[0],), -1, dtype=torch.long)
    pos[kept] = torch.arange(kept.numel())
    groups = torch.where(groups >= 0, pos[groups.clamp_min(0)], -1)
    groups[kept] = torch.arange(kept.numel())
    out = tokens[kept.to(tokens.device)].clone()
    for i, v in new.items():
        out[int(pos[i])] = v.to(tokens.dtype)
    return kept.to(tokens.device), out, groups.to(tokens.device)


def official_keep(tokens: torch.Tensor, frames: torch.Tensor, coords: torch.Tensor, ratio: float = 0.25,
                  tau: float = 0.8, max_window: int = 1024) -> int:
    """The ``keep`` that reproduces RETAIN_RATIO = ratio: the always-kept tokens plus the official counts at
    r' = min(ratio / ((T n - saved) / (T n)), 1)."""
    members, fixed = split_layout(frames, coords)
    units = plan_units(tokens, members, coords, tau, max_window)
    total = sum(m.numel() for m in members)
    saved = sum(p.numel() * (w[1] - w[0]) for kind, w, p in units if kind == "static")
    q = min(ratio / ((total - saved) / total), 1)
    return fixed.numel() + sum(unit_count(k, p.numel(), q) for k, _, p in units)


class HoliTomPruner(Pruner):
    name = "holitom"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    wheres = ("pre_llm",)
    default_where = "pre_llm"
    options = {
        "tau": Option("float", "a position is static in a window if its similarity to the next frame exceeds this "
                      "all through it (the paper: 0.8; 0.65 at 10 %)", 0.8, low=-1, high=1),
        "beta": Option("float", "weight of a cluster centre's own features when merging its members", 0.6,
                       low=0, high=1),
        "d": Option("float", "share of a frame's tokens that are contextual (DPC-kNN merged) rather than "
                    "top-attention", 0.0, low=0, high=1),
        "knn": Option("int", "neighbours of the DPC-kNN density (capped at the number of centres)", 7, low=1),
        "max_window": Option("int", "most frames in one static window", 1024, low=1)}
    signals = Signals("tower.received", required=("tower.received",))  # refused where the tower is not hooked
    scored = True  # its scores rank every entering token (keep=auto,mass=)

    def tower_score(self, rec: TowerRecord, layers: list[int]) -> torch.Tensor:
        """[n, S - prefix] the attention each patch receives (mean over heads and query rows) in the last layer,
        or None where this pass recorded none (a batch of videos only has no image record)."""
        got = rec.received.get(layers[-1])
        return None if got is None else got[:, rec.prefix:].float()

    def select(self, inp: StageInput) -> Selection:
        o = inp.options
        video = inp.frames is not None and bool((inp.frames >= 0).any())
        frames = inp.frames if video else inp.coords[:, 0]
        attn = cls_or_surrogate(inp)
        keep_idx, tokens, groups = holitom_select(inp.tokens, frames, inp.coords, attn, inp.keep,
                                                  **{k: self.option(o, k) for k in self.options})
        return Selection(keep_idx=keep_idx, scores=attn, tokens=tokens, groups=groups)

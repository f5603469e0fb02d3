"""`vidcom2`: VidCom2 (Liu et al., 2025, "Video Compression Commander: Plug-and-Play Inference
Acceleration for Video Large Language Models").

Transcribed from the official code, xuyang-liu16/VidCom2 ``token_compressor/vidcom2/vidcom2.py::
vidcom2_compression`` (model "llava_ov": 196 tokens a frame, "linear" mapping), called by
``token_compressor/vidcom2/models/llava.py::cus_prepare_inputs_labels_for_multimodal`` on a video's
projected, 2x2-pooled frame features (``get_2dPool``) flattened to [T * 196, D], before the newline token
is appended; ``base_scale`` = env ``R_RATIO`` (default 0.25). It reads no attention. Still images are not
compressed there. The steps (T frames of n tokens, x [T * n, D]):

1. ``select_low_var_channels``: the int(D * 0.5) channels of lowest variance over the video's tokens
   (population variance, ``topk(largest=False)``: ascending variance order);
2. ``compute_gaussian_scores``: the selected features L2-normalised per token; video centre = the mean of
   all tokens, frame centre = the mean of the frame's tokens; each score is the multi-scale Gaussian kernel
   sum_a exp(-||x - c||^2 / (2a)), a in 2^-3 .. 2^1, giving vid_score and frame_score [T, n];
3. ``compute_scales``: frame uniqueness s_t = -mean(vid_score of frame t); p = softmax((s - max s) / 0.01);
   scale_t = base * (1 + p_t - mean(p)), clamped at 1;
4. ``select_outlier_indices``: frame t keeps k_t = max(1, round(scale_t * n)) tokens (torch round: half to
   even), its k_t lowest vid_score + frame_score (the most distinct), in index order.

Budget, our mapping: ``keep`` is the stage's total and is met exactly. Tokens outside the video's frame
grids (still images, ``frames == -1``, and tokens off a frame's full grid, e.g. OneVision's newline after
the last frame, which the official code appends after compressing) are always kept; the rest, keep_v, goes
to the frames as the official k_t at a base that keeps exactly keep_v. Each k_t is non-decreasing in the
base, so every base with sum k_t = keep_v gives the same k_t: with keep_v = the official total at
``R_RATIO`` = r (``official_keep``; r = 0.25 on 32 x 196 tokens: 31 x 47 + 96 = 1553 when one frame takes
the softmax, not 1568) the budgets, hence the kept set, are the official ones. The base is found by bisection over float32
values (the official arithmetic is float32). Where no base hits keep_v (the total jumps past it), the
frames that step up at the jump get the remaining tokens by frame uniqueness (then index); with keep_v
< T (the official keeps >= 1 token a frame), the keep_v most unique frames keep one token each.

Other choices:
- the scores are computed in float32 (the official code runs in the model's dtype, bf16/fp16 on GPU);
- ties in variance or score go to the lower index (the official ``topk`` leaves them open);
- frames are the request's video frames ranked by index; without a video (image requests, which the
  official code does not compress) each image / tile (``coords[:, 0]``) is one frame;
- frames of unequal size (a ragged layout after an earlier stage): per-frame means over their own tokens,
  the video centre over all of them, k_t = round(scale_t * n_t); equal sizes take the official tensor path.
Checked against a transcription of ``vidcom2_compression`` at 8 x 64, 16 x 169, 8 / 32 x 196 tokens
(25 % and 10 %) and through the engine (tests/test_official_vidcom2.py): the kept sets are the official ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Pruner, Selection, StageInput
from .dycoke import frame_members
from .frame_budget import frame_grid
from .grid import lattice
from .options import Option

ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)  # the official 2**k for k in range(-3, 2)


def split_layout(frames: torch.Tensor, coords: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """frames [N] (-1: still image), coords [N, 3] -> (grid tokens of each frame [n_t] in sequence order,
    frames in index order; the always-kept tokens [e], sorted: images and tokens off a frame's full grid)."""
    fixed = [(frames.cpu() < 0).nonzero().flatten()]
    members = []
    for m in frame_members(frames):
        grid = frame_grid(coords[m.to(coords.device)].cpu())
        if grid is not None and 0 < grid[3].numel() < m.numel():
            off = torch.zeros(m.numel(), dtype=torch.bool)
            off[grid[3]] = True
            fixed.append(m[off])
            m = m[~off]
        members.append(m)
    return members, torch.cat(fixed).sort().values


def low_var_channels(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """x [M, D] -> [M, k]: the k = max(1, int(D * ratio)) channels of lowest population variance over the
    M tokens, in ascending variance order (ties: lower channel)."""
    var = x.var(dim=0, unbiased=False)
    k = max(1, int(x.shape[-1] * ratio))
    return x[:, torch.sort(var, stable=True).indices[:k]]


def multi_gaussian(x: torch.Tensor, center: torch.Tensor, alphas=ALPHAS) -> torch.Tensor:
    """x [..., n, C], center broadcastable -> [..., n]: sum over a of exp(-||x - center||^2 / (2a))."""
    dist_sq = ((x - center) ** 2).sum(dim=-1)
    return sum(torch.exp(-dist_sq / (2 * a)) for a in alphas)


def gaussian_scores(x: torch.Tensor, sizes: list[int], alphas=ALPHAS) -> tuple[list, list]:
    """x [sum(sizes), C] selected channels, frame-major -> (vid_score, frame_score): per frame [n_t] each,
    the kernel to the video's mean (normalised) token and to the frame's. Equal sizes: the official path."""
    if len(set(sizes)) == 1:
        frames = F.normalize(x.view(len(sizes), sizes[0], x.shape[-1]), dim=-1)
        v = multi_gaussian(frames, frames.mean(dim=(0, 1), keepdim=True), alphas)
        f = multi_gaussian(frames, frames.mean(dim=1, keepdim=True), alphas)
        return list(v), list(f)
    xn = F.normalize(x, dim=-1)
    center = xn.mean(dim=0, keepdim=True)
    parts = xn.split(sizes)
    return ([multi_gaussian(p, center, alphas) for p in parts],
            [multi_gaussian(p, p.mean(dim=0, keepdim=True), alphas) for p in parts])


def frame_counts(uniq: torch.Tensor, sizes: torch.Tensor, base: float, temperature: float = 0.01) -> torch.Tensor:
    """uniq [T] frame uniqueness, sizes [T] float32 -> [T] official token counts at ``base``:
    max(1, round(min(1, base (1 + p - mean p)) n_t)), p = softmax((uniq - max) / temperature)."""
    probs = F.softmax((uniq - uniq.max()) / temperature, dim=0)
    scales = (base * (1 + probs - probs.mean())).clamp(max=1.0)
    return (scales * sizes).round().long().clamp(min=1)


def _f32(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


def frame_budgets(uniq: torch.Tensor, sizes: list[int], keep_v: int, temperature: float = 0.01) -> list[int]:
    """[T] tokens of each frame, summing to keep_v (<= sum(sizes)): the official counts at a base that keeps
    exactly keep_v (bisection over float32 bases in [0, 2]; see the module docstring for the rest)."""
    t = len(sizes)
    by_uniq = sorted(range(t), key=lambda i: (-float(uniq[i]), i))
    if keep_v <= t:
        return [1 if i in by_uniq[:keep_v] else 0 for i in range(t)]
    n = torch.tensor(sizes, dtype=torch.float32)

    def counts(bits):
        return frame_counts(uniq, n, _f32(bits), temperature)

    lo, hi = 0, int(torch.tensor(2.0).view(torch.int32))  # counts(0) = 1 a frame < keep_v; counts(2.0) = sizes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if int(counts(mid).sum()) < keep_v else (lo, mid)
    k_hi = counts(hi)
    if int(k_hi.sum()) == keep_v:
        return k_hi.tolist()
    k = counts(lo).tolist()
    need = keep_v - sum(k)
    for i in by_uniq:  # the frames that step up at the jump, most unique first
        add = min(need, int(k_hi[i]) - k[i])
        k[i] += add
        need -= add
    return k


def vidcom2_scores(x: torch.Tensor, sizes: list[int], channels: float = 0.5, alphas=ALPHAS):
    """x [sum(sizes), D] the video's frame-major tokens -> (token similarity [sum(sizes)]: vid_score +
    frame_score, lower is more distinct; frame uniqueness [T]: -mean vid_score of each frame)."""
    v, f = gaussian_scores(low_var_channels(x.float(), channels), sizes, alphas)
    if len(set(sizes)) == 1:
        uniq = -torch.stack(v).mean(dim=-1)
    else:
        uniq = -torch.stack([s.mean() for s in v])
    return torch.cat([a + b for a, b in zip(v, f)]), uniq


def vidcom2_select(tokens: torch.Tensor, frames: torch.Tensor, keep: int, coords: torch.Tensor,
                   temperature: float = 0.01, channels: float = 0.5, alphas=ALPHAS):
    """tokens [N, D], frames [N] (-1: still image), keep, coords [N, 3] -> (keep_idx [keep] sorted,
    scores [N]: -(vid_score + frame_score), 0 for the always-kept tokens). Pure and deterministic."""
    n = tokens.shape[0]
    members, fixed = split_layout(frames, coords)
    scores = torch.zeros(n)
    if keep <= fixed.numel() or not members:
        kept = fixed if keep >= fixed.numel() else fixed[lattice(coords[fixed.to(coords.device)].cpu(), keep)]
        return kept.sort().values.to(tokens.device), scores.to(tokens.device)
    sizes = [m.numel() for m in members]
    order = torch.cat(members)
    sim, uniq = vidcom2_scores(tokens[order.to(tokens.device)], sizes, channels, alphas)
    sim = sim.cpu()
    scores[order] = -sim
    parts = [fixed]
    for m, s, k in zip(members, sim.split(sizes), frame_budgets(uniq.cpu(), sizes, keep - fixed.numel(), temperature)):
        parts.append(m[torch.sort(s, stable=True).indices[:k]])  # the k most distinct (ties: lower position)
    return torch.cat(parts).sort().values.to(tokens.device), scores.to(tokens.device)


def official_keep(tokens: torch.Tensor, frames: torch.Tensor, coords: torch.Tensor, ratio: float = 0.25,
                  temperature: float = 0.01, channels: float = 0.5) -> int:
    """The ``keep`` that reproduces the official code at ``R_RATIO`` = ratio: the always-kept tokens plus
    sum over frames of max(1, round(scale_t n_t)) at base = ratio."""
    members, fixed = split_layout(frames, coords)
    sizes = [m.numel() for m in members]
    _, uniq = vidcom2_scores(tokens[torch.cat(members).to(tokens.device)], sizes, channels)
    return fixed.numel() + int(frame_counts(uniq.cpu(), torch.tensor(sizes, dtype=torch.float32), ratio,
                                            temperature).sum())


class VidCom2Pruner(Pruner):
    name = "vidcom2"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("pre_llm",)
    default_where = "pre_llm"
    options = {
        "temperature": Option("float", "softmax temperature of the frame-uniqueness budgets", 0.01, low=1e-4),
        "channels": Option("float", "share of the feature channels (lowest variance) the scores read", 0.5,
                           low=0.01, high=1),
        "alphas": Option("floats", "bandwidths a of the multi-scale Gaussian kernel exp(-d^2 / 2a)",
                         list(ALPHAS), low=1e-6)}

    def select(self, inp: StageInput) -> Selection:
        o = inp.options
        video = inp.frames is not None and bool((inp.frames >= 0).any())
        frames = inp.frames if video else inp.coords[:, 0]
        keep_idx, scores = vidcom2_select(inp.tokens, frames, inp.keep, inp.coords, self.option(o, "temperature"),
                                          self.option(o, "channels"), tuple(self.option(o, "alphas")))
        return Selection(keep_idx=keep_idx, scores=scores)

"""`dycoke`: DyCoke's temporal token merging, TTM (Tao et al., 2025, "DyCoke: Dynamic Compression
of Tokens for Fast Video Large Language Models").

Transcribed from the official code, KD-TAO/DyCoke ``llava/model/llava_arch.py::dycole_ttm``
(run on the projected frame features of LLaVA-OneVision before the LLM). Each frame either is a
*reference* (kept whole) or is compared with one earlier frame: token p of frame t against token p
of its reference frame r(t), by cosine similarity, and keeps its tokens LEAST similar to it.
The reference map of the official two passes (frames numbered 0..T-1 in time order):

- pairs: for i in range(0, T - 1, 2): r(i + 1) = i;
- windows of 4: for i in range(0, T - 4, 4): r(i + 2) = i (overriding frame i + 2's "whole").

So in a window [i, i+1, i+2, i+3] frame i is whole, i+1 and i+2 are compared with i, and i+3
with the (original features of) i+2. As in the official loop bound ``range(0, T - 4, 4)``, the
last window is left to the pairs pass when T is a multiple of 4 (T = 8: frames 0, 4, 6 whole; T = 4:
pairs only). ``window`` = 2 gives the pairs pass alone; a larger power of two adds the same step at
every doubling s = 2, 4, .. window/2: for i in range(0, T - 2s, 2s): r(i + s) = i (window = 4 is the
official code). The compared frames keep their tokens in original order (the official ``topk``
order is ascending similarity; positions are original here at every stage anyway).

Budget, our mapping (the official code has a fixed K = 0.7: each compared frame keeps
int((1 - K) * 196) tokens). Here ``keep`` is the stage's total and is met exactly, in tiers:

1. tokens of still images in the same request (``frames == -1``) are always kept;
2. reference frames whole;
3. the rest, ``keep - tier 1 - tier 2``, over the compared frames in proportion to their token
   counts (largest remainder), i.e. K = 1 - rest / (tokens of compared frames); each keeps its
   least-similar tokens (ties: lower position first).

When ``keep`` does not reach a tier whole, that tier is thinned evenly instead and the later
tiers get nothing: its budget split over its frames / images by size and an even 2-D lattice
taken in each (``grid.lattice`` on the tokens' coords; without coords, an even stride in order).
``keep`` = 3098 of 32 x 196 tokens (frames 0, 4, .., 24, 28, 30 whole) reproduces the official
K = 0.7 on LLaVA-OneVision's 32 frames; ``official_keep`` computes it for any layout.

Choices where the official code assumes a fixed layout (T even, 196 tokens a frame):
- frames are ranked by their index (gaps, e.g. after a frames stage, are closed up); position
  within a frame = rank of the token among that frame's tokens, in sequence order;
- frames of unequal size are compared on the common prefix of positions: tokens past the end of
  the reference frame have no counterpart and rank as least similar (kept first), e.g. the
  newline token LLaVA-OneVision appends to the last frame;
- an odd last frame (no pair; the official code drops it) is a reference frame;
- without ``frames`` (no video in the request) the item index ``coords[:, 0]`` is the frame.
- ties in similarity: lower position first (the official ``topk`` leaves their order open).
Checked against a transcription of ``dycole_ttm`` at 8 x 64, 6 x 64, 12 x 196, 16 x 169 and 32 x 196
tokens and through the engine (tests/test_official_video.py): the kept sets are the official ones.

Not part of this stage: DyCoke's second part, dynamic KV-cache pruning during decoding
(``llava/model/language_model/modeling_qwen2.py::PrunableDynamicCache``, dycoke_l = 3, dycoke_p = 0.8):
at every decoding step, layer 3 reads the previous layer's head-mean attention of the new token to the
video tokens; when its cosine with the previous step's is below 0.9 (always at the first step), layers
3.. attend to the top int(0.2 x video tokens) of them only (plus every non-video token), otherwise to
the full cache. It selects per decoding step from live attention, which no stage of this engine does
(stages run on the prefill).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.errors import PlanError
from .base import Pruner, Selection, StageInput
from .options import Option
from .grid import lattice, split_budget


def reference_map(n_frames: int, window: int = 4) -> list[int | None]:
    """[T] the reference frame of each frame (None: kept whole), the official two passes generalised."""
    if window < 2 or window & (window - 1):
        raise PlanError(f"dycoke: window must be a power of two >= 2, not {window}")
    ref: list[int | None] = [None] * n_frames
    for i in range(0, n_frames - 1, 2):
        ref[i + 1] = i
    s = 2
    while 2 * s <= window:
        for i in range(0, n_frames - 2 * s, 2 * s):
            ref[i + s] = i
        s *= 2
    return ref


def frame_members(frames: torch.Tensor) -> list[torch.Tensor]:
    """Token indices of each video frame (frames >= 0), frames in ascending index order."""
    f = frames.cpu()
    return [(f == v).nonzero().flatten() for v in f[f >= 0].unique(sorted=True)]


def official_keep(frames: torch.Tensor, window: int = 4, k: float = 0.7) -> int:
    """The total the official code keeps for this layout: images + reference frames + int((1-k) n) a compared frame."""
    members = frame_members(frames)
    ref = reference_map(len(members), window)
    kept = int((frames < 0).sum())
    for t, m in enumerate(members):
        kept += m.numel() if ref[t] is None else int((1 - k) * m.numel())
    return kept


def _thin(idx: torch.Tensor, k: int, coords: torch.Tensor | None) -> torch.Tensor:
    """k of the tokens ``idx``, spread evenly (2-D lattice per item with coords, else an even stride)."""
    if k >= idx.numel():
        return idx
    if k <= 0:
        return idx[:0]
    if coords is not None:
        return idx[lattice(coords[idx.to(coords.device)].cpu(), k)]
    return idx[((torch.arange(k) + 0.5) * idx.numel() / k).long()]


def dycoke_ttm(tokens: torch.Tensor, frames: torch.Tensor, keep: int, window: int = 4,
               coords: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [N, D], frames [N] (frame index, -1: still image), keep -> (keep_idx [keep] sorted, scores [N]).

    scores: 1 - cosine to the same-position token of the reference frame (2 for tokens of reference
    frames, images, and positions without a counterpart). coords [N, 3] (optional): used only to
    thin a tier that does not fit whole (see the module docstring). Pure and deterministic.
    """
    n = tokens.shape[0]
    frames = frames.cpu().long()
    members = frame_members(frames)
    ref = reference_map(len(members), window)
    pairs = [(members[t][:m], members[r][:m]) for t, r in enumerate(ref) if r is not None
             for m in [min(members[t].numel(), members[r].numel())]]  # common prefix of positions
    sim = torch.full((n,), float("-inf"))  # -inf: no counterpart (ranks least similar)
    if pairs:
        a, b = torch.cat([q for q, _ in pairs]), torch.cat([q for _, q in pairs])
        x = F.normalize(tokens.float(), dim=-1)
        sim[a] = (x[a.to(x.device)] * x[b.to(x.device)]).sum(-1).cpu()
    is_ref = torch.zeros(n, dtype=torch.bool)
    is_ref[frames < 0] = True
    for t, r in enumerate(ref):
        if r is None:
            is_ref[members[t]] = True
    scores = torch.where(is_ref, torch.tensor(2.0), (1 - sim).clamp(max=2.0))

    images = (frames < 0).nonzero().flatten()
    whole = [members[t] for t, r in enumerate(ref) if r is None]
    compared = [members[t] for t, r in enumerate(ref) if r is not None]
    n_whole = sum(m.numel() for m in whole)
    budget = keep
    if budget <= images.numel():  # tier 1 does not fit
        keep_idx = _thin(images, budget, coords)
    elif budget - images.numel() <= n_whole:  # tier 2 does not fit (or fits exactly)
        refs = torch.cat(whole).sort().values
        keep_idx = torch.cat([images, _thin(refs, budget - images.numel(), coords)])
    else:
        rest = budget - images.numel() - n_whole
        parts = [images] + whole
        for m, k in zip(compared, split_budget([m.numel() for m in compared], rest)):
            order = torch.sort(sim[m], stable=True).indices  # ascending similarity, ties by position
            parts.append(m[order[:k]])
        keep_idx = torch.cat(parts)
    return keep_idx.sort().values.to(tokens.device), scores.to(tokens.device)


class DyCokePruner(Pruner):
    name = "dycoke"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("pre_llm",)
    default_where = "pre_llm"
    options = {"window": Option("int", "frames per merging window (2: pairs only)", 4, low=2)}

    def select(self, inp: StageInput) -> Selection:
        frames = inp.frames if inp.frames is not None else inp.coords[:, 0]
        keep_idx, scores = dycoke_ttm(inp.tokens, frames, inp.keep, self.option(inp.options, "window"), inp.coords)
        return Selection(keep_idx=keep_idx, scores=scores)

"""Frame budgets: a video's token budget shared out over its frames, then pruned frame by frame.

The machinery behind the ``where="frames"`` pruners (`quota`, `keyscore`). A subclass supplies
one weight per frame (``FrameBudgetPruner.frame_weights``); the stage then

1. splits its total ``keep`` over the frames in proportion to the weights (``allocate_budgets``),
   each frame's share capped at its token count, frames with no share dropped whole;
2. reduces each kept frame to its share with the ``within`` step: by default QuoTA's bilinear
   resize of the frame's token grid (``resize_frame``), or any registered spatial pruner run on
   that frame alone (``within=uniform``, ``divprune``, ``cls``, ``tome``, ...).

Choices (QuoTA's official code, MAC-AutoML/QuoTA ``core/llava_arch.py::token_compress`` with
``quota_pipeline.py``'s setting ``enhance_version = "v1"``, leaves these open or fixes them otherwise):

- Allocation: the official budget is ``int(total * w_i)`` with ``w`` normalised, frames at 0
  dropped, no cap (v1 may even upsample a frame). Here the shares are capped at each frame's token
  count and a capped frame's excess is re-spread over the others in proportion to their weights,
  iterated until nothing exceeds its cap (water-filling; the official ``scale_weights``, used by its
  versions v2-v5 only, is a single pass that spreads the excess in proportion to w_i / sum(all weights
  after capping) and caps again in frame order, so it can leave part of the total unspent); the tokens
  the floors leave over go one each, by largest fractional part (ties: earlier frame), to frames of
  positive weight. So the stage keeps exactly ``total`` whenever the frames of positive weight hold that
  many tokens. Where the official floors already sum to ``total`` and no frame exceeds its tokens, the
  budgets are the official ones; otherwise a frame of positive weight can get the one token more (even
  from a floor of 0) that the official rule does not give it. All weights 0 (or none given): every
  frame weighs the same.
- ``within="resize"`` makes NEW tokens, h' x w' of them with h' * w' <= the frame's budget, so a
  frames stage with resize keeps at most ``keep`` tokens (often a few fewer). The other ``within``
  choices keep exactly the frame's budget. The grid resized is the one the stage is handed: on
  LLaVA-OneVision the frames after the model's 2x2 bilinear pooling (14 x 14); the official v1 resizes
  LLaVA-Video's unpooled 27 x 27 SigLIP grid (``token_compress`` skips the pooling except in v4), which
  transformers' ``get_video_features`` pools before handing the features on. Tokens outside a frame's grid (the newline
  LLaVA-OneVision puts after the last frame) are kept as they are and count toward the frame's budget;
  the official code appends its newlines after the resize (one a row, LLaVA-Video's "grid" layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..engine.errors import PlanError
from .base import Pruner, Selection, StageInput
from .options import Option


# ---- the signals a frames scorer computes -----------------------------------------------------

@dataclass
class FrameSignals:
    """What a frames pruner's scorer computed for one request's video.

    A scorer (``quota.RelevanceScorer``, ``keyscore.ClipScorer``) is built by the engine from a stage's
    options (``build(options, models)``, ``models``: the engine's frame models, ``vlm(spec)`` / ``clip(name)``),
    checked once (``check(label)``: PlanError naming what to change) and called per request:
    ``score(question, frames) -> FrameSignals``, frames: the video's sampled frames (PIL images).

    per_frame:   StageInput field -> [T_sampled, ...] (the engine maps them to the model's grid frames)
    per_request: StageInput field -> a tensor of the request (e.g. the question's embedding)
    flops:       what computing them cost (reported as ``scoring_flops``)
    """

    per_frame: dict = field(default_factory=dict)
    per_request: dict = field(default_factory=dict)
    flops: int = 0


# ---- allocation ------------------------------------------------------------------------------

def allocate_budgets(weights: torch.Tensor, total: int, capacity: torch.Tensor) -> torch.Tensor:
    """weights [T] (>= 0), total, capacity [T] (tokens of each frame) -> budgets [T] long.

    QuoTA's n_i = floor(total * w_i / sum(w)) on the frames of positive weight, capped at each frame's
    capacity (a capped frame's excess re-spread over the uncapped ones in proportion to their weight,
    until none exceeds its cap); the remainder by largest fractional part (ties: lower frame index).
    sum(budgets) == min(total, capacity of the frames of positive weight). Exact and deterministic
    (float64 quotas, integer bookkeeping).
    """
    w = weights.detach().double().cpu().clamp_min(0).nan_to_num(0.0)
    cap = capacity.detach().long().cpu()
    n_frames = w.numel()
    if cap.numel() != n_frames:
        raise ValueError(f"allocate_budgets: {n_frames} weights for {cap.numel()} capacities")
    if n_frames == 0 or total <= 0:
        return torch.zeros(n_frames, dtype=torch.long)
    if float(w.sum()) <= 0:
        w = torch.ones(n_frames, dtype=torch.float64)
    active = (w > 0) & (cap > 0)
    quota = torch.zeros(n_frames, dtype=torch.float64)
    capped = torch.zeros(n_frames, dtype=torch.bool)
    while True:  # water-filling: fix the frames whose share exceeds their capacity, re-spread the rest
        free = active & ~capped
        left = total - int(cap[capped].sum())
        if not bool(free.any()) or left <= 0:
            break
        share = w[free] / w[free].sum()  # normalised first, then scaled: the official int(total * w_i)
        q = torch.zeros(n_frames, dtype=torch.float64)
        q[free] = left * share
        over = free & (q > cap.double())
        if not bool(over.any()):
            quota[free] = q[free]
            break
        capped |= over
    budgets = torch.where(capped, cap, quota.floor().long().minimum(cap))
    budgets[~active] = 0
    rest = min(total, int(cap[active].sum())) - int(budgets.sum())
    if rest > 0:
        frac = quota - budgets.double()
        room = active & ~capped & (budgets < cap)
        order = sorted((i for i in range(n_frames) if bool(room[i])), key=lambda i: (-float(frac[i]), i))
        while rest > 0 and order:  # one pass in practice (the floors leave < one token per frame)
            for i in order[:rest]:
                budgets[i] += 1
            rest -= min(rest, len(order))
            order = [i for i in order if budgets[i] < cap[i]]
    return budgets


# ---- within-frame step: QuoTA's bilinear resize -----------------------------------------------

def resize_shape(h: int, w: int, budget: int) -> tuple[int, int]:
    """(h', w'): QuoTA's target grid for a frame of h x w tokens given ``budget`` (h' * w' <= budget).

    Official rule (square grids): h' = w' = floor(sqrt(budget)); then one more row if it fits, else one
    more column if it fits. On an h x w grid the same rule with the aspect ratio kept:
    h' = floor(sqrt(budget * h / w)), w' = floor(sqrt(budget * w / h)), each in [1, h] / [1, w], then the
    same single bump (which reduces to the official rule when h == w).
    """
    budget = max(int(budget), 1)
    th = min(max(math.isqrt(budget * h // w), 1), h)
    tw = min(max(math.isqrt(budget * w // h), 1), w)
    tw = min(tw, budget // th)
    th = min(th, budget // tw)
    if th * tw < budget:
        if (th + 1) * tw <= budget and th + 1 <= h:
            th += 1
        elif th * (tw + 1) <= budget and tw + 1 <= w:
            tw += 1
    return th, tw


def nearest_cells(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis of n_in cells resized to n_out <= n_in (cells of width n_in / n_out):

    slot [n_out]: the input cell holding each output cell's centre, floor((j + 1/2) n_in / n_out);
    owner [n_in]: the output cell holding each input cell's centre, floor((i + 1/2) n_out / n_in).
    Integer arithmetic, so exact; owner[slot[j]] == j.
    """
    j = torch.arange(n_out)
    i = torch.arange(n_in)
    return ((2 * j + 1) * n_in) // (2 * n_out), ((2 * i + 1) * n_out) // (2 * n_in)


def frame_grid(coords: torch.Tensor) -> tuple[int, int, torch.Tensor, torch.Tensor] | None:
    """coords [n, 3] of one frame -> (h, w, pos [h*w]: the token at each raster cell, extra [e]: the tokens
    outside the grid), or None if the tokens are not one full h x w grid plus such extras (ragged, or thinned
    by an earlier stage). The grid is rows 0..h-1 x cols 0..w-1, h = the rows present in column 0, w = the
    columns present in row 0; an extra is e.g. LLaVA-OneVision's newline after the last frame (at col w)."""
    rows, cols = coords[:, 1].long().cpu(), coords[:, 2].long().cpu()
    if rows.numel() == 0 or int(rows.min()) < 0 or int(cols.min()) < 0:
        return None
    if not bool(((rows == 0) & (cols == 0)).any()):
        return None
    h, w = int(rows[cols == 0].max()) + 1, int(cols[rows == 0].max()) + 1
    inside = (rows < h) & (cols < w)
    raster = rows[inside] * w + cols[inside]
    if h * w != raster.numel() or raster.unique().numel() != raster.numel():
        return None
    pos = torch.empty(h * w, dtype=torch.long)
    pos[raster] = inside.nonzero().flatten()
    return h, w, pos, (~inside).nonzero().flatten()


def resize_frame(x: torch.Tensor, coords: torch.Tensor, budget: int):
    """QuoTA's default within-frame step: bilinear resize of the frame's token grid.

    x [n, D], coords [n, 3] (row, col in columns 1, 2) -> (keep_idx [k] sorted, tokens [k, D], groups [n]),
    k = h' * w' + e <= budget (``resize_shape`` on budget - e; e = the tokens outside the grid, kept as
    they are, e.g. LLaVA-OneVision's newline, which the official code appends after the resize).
    tokens = ``F.interpolate(grid, (h', w'), mode="bilinear")`` with PyTorch's default align_corners=False
    (as the official call), computed in float32, cast back. Each output cell sits at the input token
    nearest its centre (its keep_idx entry); groups maps every input token to the output cell whose centre
    is nearest (its position in keep_idx). A frame that is not one full grid (or whose budget does not
    exceed its extras) is resized as a 1 x n row in sequence order (linear interpolation).
    """
    n, d = x.shape
    grid = frame_grid(coords)
    if grid is None or grid[3].numel() >= min(budget, n):
        grid = (1, n, torch.arange(n), torch.zeros(0, dtype=torch.long))
    h, w, pos, extra = grid
    th, tw = resize_shape(h, w, min(budget, n) - extra.numel())
    if (th, tw) == (h, w):  # nothing to resize: the identity
        idx = torch.arange(n, device=x.device)
        return idx, x.clone(), idx.clone()
    img = x.float()[pos.to(x.device)].T.reshape(1, d, h, w)
    out = F.interpolate(img, size=(th, tw), mode="bilinear")  # align_corners=None -> False
    out = torch.cat([out.reshape(d, th * tw).T, x.float()[extra.to(x.device)]])  # [k, D]: cells in raster order, extras
    slot_r, own_r = nearest_cells(h, th)
    slot_c, own_c = nearest_cells(w, tw)
    slots = torch.cat([pos[(slot_r[:, None] * w + slot_c[None, :]).flatten()], extra])  # token of each output
    keep_idx, order = slots.sort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())  # output -> place in keep_idx
    cell_of_raster = (own_r[:, None] * tw + own_c[None, :]).flatten()  # [h*w] output cell of each raster cell
    groups = torch.empty(n, dtype=torch.long)
    groups[pos] = rank[cell_of_raster]
    groups[extra] = rank[th * tw + torch.arange(extra.numel())]
    dev = x.device
    return keep_idx.to(dev), out[order.to(dev)].to(x.dtype), groups.to(dev)


# ---- within-frame step: a registered spatial pruner -------------------------------------------

def _slice(value, idx: torch.Tensor, n: int, dim: int):
    if value is None or value.dim() <= dim or value.shape[dim] != n:
        return None
    return value.index_select(dim, idx.to(value.device))


def within_pruner(name: str, label: str = "frames stage") -> Pruner:
    """The spatial pruner named by ``within`` (PlanError if it cannot run on one frame's tokens)."""
    from . import get_pruner

    pruner = get_pruner(name, stage_label=f"{label}: within")
    if isinstance(pruner, FrameBudgetPruner):
        raise PlanError(f"{label}: within={name} is itself a frames pruner")
    llm = sorted(pruner.signals.of("llm"))
    if llm:
        raise PlanError(f"{label}: within={name} reads LLM attention ({', '.join(llm)}), which a frames stage "
                        "(before the LLM) does not have; use a spatial pruner (uniform, divprune, cls, tome, ...)")
    return pruner


def _check_within(name: str, label: str) -> None:
    if name != "resize":
        within_pruner(name, label.rsplit(": ", 1)[0])  # "stage 0 (quota): within" -> its stage


WITHIN = Option("str", "how each frame is pruned to its budget: resize (a bilinear resize of the frame's grid, "
                "QuoTA's default) or a spatial pruner's name", "resize", check=_check_within)


def prune_frame(pruner: Pruner, inp: StageInput, idx: torch.Tensor, budget: int, seed: int) -> Selection:
    """Run ``pruner`` on the tokens ``idx`` of one frame with ``budget``; coords with item 0."""
    n = inp.tokens.shape[0]
    dev_idx = idx.to(inp.tokens.device)
    coords = inp.coords[idx.to(inp.coords.device)].clone()
    coords[:, 0] = 0
    sub = StageInput(tokens=inp.tokens[dev_idx], keep=budget, coords=coords, options={}, seed=seed,
                     attn=_slice(inp.attn, idx, n, 1), tower_score=_slice(inp.tower_score, idx, n, 0),
                     keys=_slice(inp.keys, idx, n, 0), text_attn=_slice(inp.text_attn, idx, n, 2),
                     sizes=_slice(inp.sizes, idx, n, 0))
    if pruner.signals.of("tower", required=True) and sub.tower_score is None:
        raise PlanError(f"within={pruner.name} needs the vision tower's signals, which this frames stage lacks")
    return pruner.select(sub)


# ---- the stage ---------------------------------------------------------------------------------

def frame_index(inp: StageInput) -> torch.Tensor:
    """[N] the frame of each token: ``inp.frames``, else the item column of the coords."""
    f = inp.frames if inp.frames is not None else inp.coords[:, 0]
    f = f.long().cpu()
    if f.numel() and int(f.min()) < 0:
        raise ValueError("a frames stage is handed only a video's tokens (frames >= 0)")
    return f


class FrameBudgetPruner(Pruner):
    """Base of the frames pruners: per-frame weights -> per-frame budgets -> the within step.

    Subclasses implement ``frame_weights``. ``select`` returns keep_idx (at most ``keep``: exactly
    ``keep`` unless ``within=resize`` rounds a frame's grid down), groups [N] (-1: dropped, which
    includes every token of a frame given no budget), merged tokens where the within step makes new
    ones, and scores [N] = the normalised weight of each token's frame (the per-frame shares).
    """

    wheres = ("frames",)
    default_where = "frames"
    options = {"within": WITHIN}

    def frame_weights(self, inp: StageInput, n_frames: int) -> torch.Tensor:
        """[T] non-negative weight of each frame (T >= n_frames, the frames the tokens name)."""
        raise NotImplementedError

    def select(self, inp: StageInput) -> Selection:
        if inp.keep is None:
            raise PlanError(f"{self.name}: a frames stage needs a count or ratio keep")
        x = inp.tokens
        n = x.shape[0]
        frames = frame_index(inp)
        n_frames = int(frames.max()) + 1 if n else 0
        weights = self.frame_weights(inp, n_frames).detach().double().cpu().flatten()
        if weights.numel() < n_frames:
            raise ValueError(f"{self.name}: {weights.numel()} frame weights for tokens of {n_frames} frames")
        capacity = torch.bincount(frames, minlength=weights.numel())
        budgets = allocate_budgets(weights, int(inp.keep), capacity)
        within = self.option(inp.options, "within")
        pruner = None if within == "resize" else within_pruner(within, self.name)

        # per kept frame: its kept tokens (global idx), new tokens | None, (frame idx, local keep, local groups | None)
        kept, new_tokens, local_groups = [], [], []
        for t in range(weights.numel()):
            b = int(budgets[t])
            if b == 0:
                continue
            idx = (frames == t).nonzero().flatten()
            if pruner is None:
                k_idx, toks, grp = resize_frame(x[idx.to(x.device)], inp.coords[idx.to(inp.coords.device)], b)
            else:
                sel = prune_frame(pruner, inp, idx, b, inp.seed + t)
                k_idx, toks, grp = sel.keep_idx, sel.tokens, sel.groups
            k_idx = k_idx.long().cpu()
            kept.append(idx[k_idx])
            new_tokens.append(toks)
            local_groups.append((idx, k_idx, None if grp is None else grp.long().cpu()))

        keep_idx = torch.cat(kept).sort().values if kept else torch.zeros(0, dtype=torch.long)
        total_w = float(weights.sum())
        share = weights / total_w if total_w > 0 else torch.full_like(weights, 1 / max(weights.numel(), 1))
        scores = share[frames].float().to(x.device)
        if not any(t is not None for t in new_tokens) and not any(g[2] is not None for g in local_groups):
            return Selection(keep_idx=keep_idx.to(x.device), scores=scores)
        place = torch.full((n,), -1, dtype=torch.long)
        place[keep_idx] = torch.arange(keep_idx.numel())
        groups = torch.full((n,), -1, dtype=torch.long)
        tokens = x[keep_idx.to(x.device)].clone()
        for glob, toks, (idx, k_idx, grp) in zip(kept, new_tokens, local_groups):
            if toks is not None:
                tokens[place[glob].to(x.device)] = toks.to(x.dtype)
            if grp is None:
                groups[glob] = place[glob]
            else:
                m = grp >= 0
                groups[idx[m]] = place[glob[grp[m]]]
        return Selection(keep_idx=keep_idx.to(x.device), scores=scores, tokens=tokens, groups=groups.to(x.device))

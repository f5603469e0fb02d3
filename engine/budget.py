"""Budgets that choose themselves: ``keep=auto`` with a rule, per request, for every pruner.

A stage written ``keep=auto`` plus a rule gets its budget (how many of the N tokens entering it survive) from
the request's own tokens, then the pruner picks that many as it would for a fixed count:

    "divprune:keep=auto,tau=0.2"              redundancy rule (no scores needed)
    "fastv:layer=2,keep=auto,mass=0.9"        importance-mass rule (pruners whose Selection.scores rank tokens)
    "divprune:keep=auto,tau=0.2,min=16,max=0.5"   bounds: a count, or a ratio of the N entering tokens
    "prumerge:keep=auto"                      an adaptive pruner's own rule (PruMerge's IQR outliers)

Rules (N tokens entering the stage, D their width):
  * mass ``m`` in (0, 1]: the pruner is first called with keep = N (a keep-all call) for its scores s [N];
    they are normalised, p = s' / sum(s') with s' = s - min(s) when any score is negative, else s (non-finite
    scores count 0; all zero: uniform); the budget is the fewest tokens whose largest p sum to at least m:
    k = min{k : sum of the k largest p >= m} (1e-6 tolerance). Reached: that sum. Cost: one more pruner call
    and a sort, O(N log N). Only for pruners that declare ``scored = True``.
  * tau ``t`` in (0, 2] on an image (tokens without frames): greedy farthest-point order on the cosine distance
    d(i, j) = 1 - cos(x_i, x_j): the first token is the one farthest from its nearest neighbour (DivPrune's
    start), each next one the token farthest from the kept set; tokens are kept while that distance is >= t:
    k = 1 + #{steps before the first whose distance falls below t}. Reached: the distance of the first token
    not kept (the kept set covers every token within it; 0 when all are kept). Cost: the N x N distance matrix,
    O(N^2 D) time and O(N^2) memory, plus O(N k) for the order.
  * tau on a video (tokens with frames >= 0): temporal redundancy per frame. The first frame's budget is the
    image rule on its tokens; a token of frame f > 0 counts as new when its cosine similarity to the token at
    the same grid position (row, col) in frame f - 1 is below 1 - t (or that position has no token there);
    frame f's budget is its number of new tokens; the video's budget is the sum (an image's tokens in the same
    request add the image rule's budget on them). Reached: the mean similarity to the previous frame over
    frames f > 0. Cost: O(n0^2 D) for the first frame (n0 tokens) plus O(N D) for the rest.
  * bounds ``min`` / ``max`` (a count >= 1, or a ratio in (0, 1] of N, max(1, round(r N))), each clipped to
    [1, N], always hold: k = min(max(k, min), max) (``max`` wins where a count and a ratio cross).

The budget each request got is reported in ``Result.stats["budgets"]``: per keep=auto stage, its rule, the
parameter, the tokens entering, the rule's budget, the budget after the bounds, what the rule reached and
which bound clipped it (None: neither).

Vision-tower stages (``where=vision``, towers the engine hooks with a CLS prefix: LLaVA-1.5) take the mass and tau
rules too, per image: each image's budget comes from its own tower tokens entering the stage (tau: their hidden
states; mass: the pruner's scores, e.g. cls's CLS attention). The images of one tower batch then keep different
counts: the batch is padded (zero rows) to the largest, the padded keys are masked out of attention in the tower
layers after the stage (a boolean mask handed to the engine's attention function, ``engine/hooks.py``), and each
image's padding rows are dropped as its features leave the tower, before the LLM (the projector acts per token,
so the kept rows are those of the image run alone). The CLS row stays. The stats hold one record per image,
with ``image`` (its index in the request) added. Refused, one clear error each: a progressive pruner (flowcut,
whose steps share one length per tower batch) with keep=auto at a vision stage, and a later stage reading the
tower's attention records (``tower.*`` signals) after a keep=auto vision stage (those records would cover the
padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import PlanError

RULE_KEYS = ("mass", "tau", "min", "max")
TAU_HIGH = 2.0  # cosine distance is at most 2
MASS_TOL = 1e-6


@dataclass(frozen=True)
class AutoBudget:
    """A keep=auto stage's rule: "own" (an adaptive pruner's, e.g. PruMerge's IQR), "mass" or "tau"; its
    parameter (None for "own") and the bounds (an int count or a float ratio of the entering tokens, or None)."""

    rule: str
    value: float | None = None
    min: int | float | None = None
    max: int | float | None = None

    def keys(self) -> list[str]:
        """The plan-string keys that write it back, e.g. ["mass=0.9", "min=16"]."""
        out = [f"{self.rule}={self.value:g}"] if self.rule != "own" else []
        return out + [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in (("min", self.min), ("max", self.max)) if v is not None]


def key_names(pruner) -> dict[str, str]:
    """Plan key -> budget key. A budget key a pruner also has as an option (FastVID's ``tau``) is written
    ``budget_<key>`` for that pruner; the ``budget_`` spelling is accepted for every pruner."""
    names = {f"budget_{k}": k for k in RULE_KEYS}
    names.update({k: k for k in RULE_KEYS if k not in pruner.option_names})
    return names


def parse_budget(item: dict, pruner, keep, where: str, label: str) -> AutoBudget | None:
    """Take the budget keys out of a stage's ``item`` (mutated) and check them; None for a fixed keep.
    Raises PlanError for rule keys without keep=auto, two rules, a value out of range, min above max, a score
    rule on a pruner without scores, a progressive pruner at a vision stage, or keep=auto with no rule on a pruner
    without one."""
    names = key_names(pruner)
    given = {names[k]: item.pop(k) for k in list(item) if k in names}
    if keep != "auto":
        if given:
            raise PlanError(f"{label}: {', '.join(sorted(given))} set(s) an automatic budget: give keep=auto with it "
                            f"(keep is {keep!r})")
        return None
    if "mass" in given and "tau" in given:
        raise PlanError(f"{label}: give one budget rule, mass= or tau=, not both")
    rule = "mass" if "mass" in given else "tau" if "tau" in given else "own"
    value = None if rule == "own" else _number(given[rule], f"{label}: {rule}")
    if rule == "mass" and not 0 < value <= 1:
        raise PlanError(f"{label}: mass must be in (0, 1] (the share of the normalised scores kept), got {value:g}")
    if rule == "tau" and not 0 < value <= TAU_HIGH:
        raise PlanError(f"{label}: tau must be in (0, 2] (a cosine distance), got {value:g}")
    lo, hi = (_bound(given.get(k), f"{label}: {k}") for k in ("min", "max"))
    if lo is not None and hi is not None and type(lo) is type(hi) and lo > hi:
        raise PlanError(f"{label}: min={lo} is above max={hi}")
    if rule == "own" and not pruner.adaptive:
        raise PlanError(f"{label}: keep=auto needs an adaptive pruner ({adaptive_names()}) or a budget rule: mass=M "
                        f"(importance mass, for pruners with scores) or tau=T (redundancy), e.g. keep=auto,tau=0.2")
    if rule == "mass" and not pruner.scored:
        raise PlanError(f"{label}: {pruner.name} gives no token scores, so the mass rule cannot apply; "
                        "use tau= (the redundancy rule)")
    if where == "vision" and pruner.progressive:
        raise PlanError(f"{label}: keep=auto at a vision-tower stage: {pruner.name} prunes step by step through the "
                        "tower with one length per tower batch and cannot give per-image budgets; give a fixed keep, "
                        "or where=pre_llm")
    return AutoBudget(rule=rule, value=value, min=lo, max=hi)


def _number(v, label: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise PlanError(f"{label} must be a number, got {v!r}")
    return float(v)


def _bound(v, label: str) -> int | float | None:
    """A bound: None, an int count >= 1, or a float ratio in (0, 1]."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (isinstance(v, float) and not v <= 1):
        raise PlanError(f"{label} must be a count >= 1 or a ratio in (0, 1] of the entering tokens, got {v!r}")
    return v


# ---- the rules: pure tensor functions ------------------------------------------------------------

def normalised(scores: torch.Tensor) -> torch.Tensor:
    """[N] scores -> [N] non-negative weights summing to 1 (shifted by the minimum when any is negative;
    non-finite -> 0; all zero -> uniform)."""
    s = torch.nan_to_num(scores.double(), nan=0.0, posinf=0.0, neginf=0.0)
    if bool((s < 0).any()):
        s = s - s.min()
    total = s.sum()
    return s / total if total > 0 else torch.full_like(s, 1.0 / s.numel())


def mass_budget(scores: torch.Tensor, mass: float) -> tuple[int, float]:
    """[N] scores, mass in (0, 1] -> (k, the mass reached): the fewest tokens whose normalised scores sum >= mass."""
    cum = normalised(scores).sort(descending=True).values.cumsum(0)  # [N]
    k = min(int((cum < mass - MASS_TOL).sum()) + 1, scores.numel())
    return k, float(cum[k - 1])


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, N] 1 - cos(x_i, x_j), float32."""
    xn = F.normalize(x.float(), dim=-1)
    return 1.0 - xn @ xn.T


def redundancy_budget(x: torch.Tensor, tau: float) -> tuple[int, float]:
    """[N, D], tau -> (k, the distance of the first token left out; 0.0 when all are kept).

    Greedy farthest-point order on the cosine distance, first the token farthest from its nearest neighbour;
    tokens are kept while their distance to the kept set is >= tau."""
    n = x.shape[0]
    if n == 1:
        return 1, 0.0
    dist = cosine_distance(x)
    nn_dist = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf")).min(1).values
    first = int(nn_dist.argmax())
    closest = dist[first].clone()  # [N] distance of each token to the kept set
    closest[first] = float("-inf")
    for k in range(1, n):
        nxt = int(closest.argmax())
        gap = float(closest[nxt])
        if gap < tau:
            return k, gap
        closest = torch.minimum(closest, dist[nxt])
        closest[nxt] = float("-inf")
    return n, 0.0


def frame_redundancy_budget(x: torch.Tensor, coords: torch.Tensor, frames: torch.Tensor,
                            tau: float) -> tuple[int, float, list[int]]:
    """x [N, D], coords [N, 3] (item, row, col), frames [N] (-1: an image's token), tau ->
    (k, mean similarity of a frame's tokens to the previous frame's at their grid position, per-frame budgets).

    First frame: ``redundancy_budget`` on its tokens; frame f > 0: its tokens whose cosine similarity to the
    same (row, col) in frame f - 1 is below 1 - tau (or with no token there); images: ``redundancy_budget``."""
    xn = F.normalize(x.float(), dim=-1)
    present = sorted(int(f) for f in frames.unique() if f >= 0)
    width = int(coords[:, 2].max()) + 1
    position = coords[:, 1].long() * width + coords[:, 2].long()  # [N]
    per_frame, sims, prev = [], [], None
    for f in present:
        idx = (frames == f).nonzero().flatten()
        if prev is None:
            per_frame.append(redundancy_budget(x[idx], tau)[0])
        else:
            table = torch.full((int(position.max()) + 1,), -1, dtype=torch.long, device=x.device)
            table[position[prev]] = prev
            match = table[position[idx]]  # [n_f] the previous frame's token at the same position, or -1
            sim = torch.full((idx.numel(),), -1.0, device=x.device)
            has = match >= 0
            sim[has] = (xn[idx[has]] * xn[match[has]]).sum(-1)
            sims.append(sim[has])
            per_frame.append(int((sim < 1.0 - tau).sum()))
        prev = idx
    img = (frames < 0).nonzero().flatten()
    k = sum(per_frame) + (redundancy_budget(x[img], tau)[0] if img.numel() else 0)
    sims = torch.cat(sims) if sims else torch.zeros(0)
    return max(k, 1), float(sims.mean()) if sims.numel() else 1.0, per_frame


def bound(k: int, n: int, lo, hi) -> tuple[int, str | None]:
    """Clip budget k of n entering tokens to the bounds (count or ratio; each within [1, n]) -> (k, "min" / "max" / None)."""
    def count(b):
        return None if b is None else min(max(1, int(round(b * n)) if isinstance(b, float) else int(b)), n)
    lo, hi = count(lo), count(hi)
    if hi is not None and k > hi:
        return hi, "max"
    if lo is not None and k < lo:
        return (lo if hi is None else min(lo, hi)), "min"
    return k, None


# ---- per request, where the engine resolves keep ----------------------------------------------------

def choose(budget: AutoBudget, tokens: torch.Tensor, coords: torch.Tensor, frames: torch.Tensor | None,
           select: Callable[[int | None], object]):
    """Run a keep=auto stage on one request: tokens [N, D], coords [N, 3], frames [N] or None (no video) of the
    tokens entering it; ``select(k)`` the pruner's selection keeping k (None: its own rule).
    Returns (the Selection, the budget's record for the stats)."""
    n = tokens.shape[0]
    rec = dict(rule=budget.rule, value=budget.value, entering=n)
    if budget.rule == "own":
        sel = select(None)
        k = int(sel.keep_idx.numel())
        rec["reached"] = None
    elif budget.rule == "mass":
        scored = select(n)
        if scored.scores is None or scored.scores.numel() != n:
            raise RuntimeError(f"{rec}: a pruner declared scored gave no [{n}] scores at keep={n}")
        k, reached = mass_budget(scored.scores, budget.value)
        rec["reached"] = reached
    elif frames is not None and bool((frames >= 0).any()):
        k, reached, per_frame = frame_redundancy_budget(tokens, coords.to(tokens.device), frames.to(tokens.device),
                                                        budget.value)
        rec.update(rule="tau-frames", reached=reached, per_frame=per_frame)
    else:
        k, reached = redundancy_budget(tokens, budget.value)
        rec["reached"] = reached
    kept, clipped = bound(k, n, budget.min, budget.max)
    rec.update(budget=k, kept=kept, clipped=clipped)
    if budget.rule != "own" or clipped is not None:
        sel = select(kept)
    return sel, rec



def check_after_vision_auto(stages) -> None:
    """Raise PlanError for a stage that reads the tower's attention records after a keep=auto vision-tower stage
    (those records cover the padded tower batch)."""
    from ..pruners import get_pruner
    from .signals import tower_records

    auto = next((i for i, s in enumerate(stages) if s.where == "vision" and s.budget is not None), None)
    for i, s in enumerate(stages):
        if auto is not None and i > auto and tower_records(get_pruner(s.pruner)):
            raise PlanError(f"stage {i} ({s.describe()}): {s.pruner} reads the vision tower's attention, which the "
                            f"keep=auto vision-tower stage {auto} leaves padded (a budget per image); give stage "
                            f"{auto} a fixed keep, or this stage a pruner that reads no tower signals")


def budget_stats(stages, budgets: dict, b: int) -> list[dict]:
    """Request b's budgets, one record per keep=auto stage that ran on it (``budgets``: stage index -> per
    request record, a list of per-image records at a vision-tower stage, or None), each with its stage index and
    pruner first."""
    out = []
    for i in sorted(budgets):
        recs = budgets[i][b]
        for rec in recs if isinstance(recs, list) else [] if recs is None else [recs]:
            out.append(dict(stage=i, pruner=stages[i].pruner, **rec))
    return out


def adaptive_names() -> str:
    """The pruners with a keep=auto rule of their own ("prumerge, prunevid, ...")."""
    from ..pruners import REGISTRY

    return ", ".join(sorted(n for n, cls in REGISTRY.items() if cls.adaptive))

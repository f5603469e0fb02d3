"""The tuner's decisions, as pure functions of the calibration table (``eval.videoqa.summary.rows``).

A row is one plan's calibration result: ``plan`` ("(full)" for the full-token run), ``accuracy`` and its
standard error ``stderr`` (fractions), and its mean cost per sample, ``prefill_flops`` and ``prefill_s``.

- ``pareto(rows, cost)``: the plans no other plan beats on both accuracy (higher) and ``cost`` (lower).
- ``choose(rows, target)``: the plan that meets the target: ``max_accuracy_drop`` (points below the full run's
  accuracy) at the least FLOPs, or ``latency_ms`` (mean prefill per sample) / ``flops_ratio`` (prefill FLOPs
  over the full run's) at the best accuracy (ties: the cheaper). A target no plan meets raises ``NoPlanMeets``
  naming the best reachable.
- ``ranking_warning(rows, chosen, target)``: the sentence saying when the calibration set is too small to
  rank the chosen plan against the target (its margin is within two standard errors), or None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

FULL = "(full)"


class NoPlanMeets(ValueError):
    """No calibrated plan meets the target; the message names the best reachable."""


@dataclass(frozen=True)
class Target:
    """One of the three targets (exactly one field set)."""

    max_accuracy_drop: float | None = None  # points, against the full-token run
    latency_ms: float | None = None  # mean prefill per sample
    flops_ratio: float | None = None  # prefill FLOPs / the full run's

    def __post_init__(self):
        given = [n for n in ("max_accuracy_drop", "latency_ms", "flops_ratio") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one target: --max-accuracy-drop, --latency-ms or --flops-ratio"
                             + (f" (got {', '.join(given)})" if given else ""))
        v = getattr(self, given[0])
        if not math.isfinite(v) or v < 0 or (given[0] != "max_accuracy_drop" and v == 0):
            raise ValueError(f"--{given[0].replace('_', '-')} must be {'>= 0' if given[0] == 'max_accuracy_drop' else '> 0'}"
                             f", got {v}")

    def describe(self) -> str:
        if self.max_accuracy_drop is not None:
            return f"at most {self.max_accuracy_drop:g} accuracy points below the full-token run, at the least FLOPs"
        if self.latency_ms is not None:
            return f"mean prefill at most {self.latency_ms:g} ms per sample, at the best accuracy"
        return f"prefill FLOPs at most {self.flops_ratio:g} x the full-token run's, at the best accuracy"


def ran(rows: list[dict]) -> list[dict]:
    """The rows with an accuracy and both costs (plans whose samples all failed are left out)."""
    return [r for r in rows if r["accuracy"] is not None and r["prefill_flops"] is not None
            and r["prefill_s"] is not None]


def full_row(rows: list[dict]) -> dict:
    row = next((r for r in ran(rows) if r["plan"] == FULL), None)
    if row is None:
        raise NoPlanMeets("the full-token run has no result on the calibration set (every sample failed?)")
    return row


def pareto(rows: list[dict], cost: str) -> list[dict]:
    """[rows] the plans on the front of accuracy (higher better) against ``cost`` ("prefill_flops" or
    "prefill_s", lower better), cheapest first; a plan is off the front when another is at least as
    accurate and at most as costly, and better in one of the two."""
    pts = ran(rows)
    front = [r for r in pts if not any(
        o["accuracy"] >= r["accuracy"] and o[cost] <= r[cost] and (o["accuracy"] > r["accuracy"] or o[cost] < r[cost])
        for o in pts)]
    return sorted(front, key=lambda r: (r[cost], -r["accuracy"]))


def meets(row: dict, full: dict, target: Target) -> bool:
    if target.max_accuracy_drop is not None:
        return 100 * (full["accuracy"] - row["accuracy"]) <= target.max_accuracy_drop + 1e-9
    if target.latency_ms is not None:
        return 1000 * row["prefill_s"] <= target.latency_ms
    return row["prefill_flops"] <= target.flops_ratio * full["prefill_flops"]


def choose(rows: list[dict], target: Target) -> dict:
    """The calibrated row that meets ``target`` best (see the module); NoPlanMeets names the best reachable."""
    full = full_row(rows)
    ok = [r for r in ran(rows) if meets(r, full, target)]
    if target.max_accuracy_drop is not None:
        if ok:  # the full run always meets a drop target >= 0
            return min(ok, key=lambda r: (r["prefill_flops"], -r["accuracy"]))
    elif ok:
        return max(ok, key=lambda r: (r["accuracy"], -r["prefill_flops"]))
    if target.latency_ms is not None:
        best = min(ran(rows), key=lambda r: r["prefill_s"])
        raise NoPlanMeets(f"no calibrated plan has a mean prefill of at most {target.latency_ms:g} ms; the fastest is "
                          f"{best['plan']} at {1000 * best['prefill_s']:.1f} ms (accuracy {100 * best['accuracy']:.1f} %)")
    best = min(ran(rows), key=lambda r: r["prefill_flops"])
    raise NoPlanMeets(f"no calibrated plan has prefill FLOPs of at most {target.flops_ratio:g} x the full run's; the "
                      f"cheapest is {best['plan']} at {best['prefill_flops'] / full['prefill_flops']:.3f} x "
                      f"(accuracy {100 * best['accuracy']:.1f} %)")


def ranking_warning(rows: list[dict], chosen: dict, target: Target) -> str | None:
    """Why the calibration set may be too small to trust the choice, or None: for an accuracy target, the
    chosen plan's margin (points left below the allowed drop) is smaller than two standard errors of the
    difference to the full run (sqrt(se_plan^2 + se_full^2), not paired: an upper bound); for a cost target,
    a cheaper-to-run plan is within two standard errors of the chosen plan's accuracy."""
    full = full_row(rows)
    se = 100 * math.sqrt((chosen["stderr"] or 0) ** 2 + (full["stderr"] or 0) ** 2)
    if target.max_accuracy_drop is not None and chosen["plan"] != FULL:
        margin = target.max_accuracy_drop - 100 * (full["accuracy"] - chosen["accuracy"])
        if margin < 2 * se:
            return (f"the calibration set is too small to rank this choice: its accuracy is "
                    f"{100 * chosen['accuracy']:.1f} ± {100 * (chosen['stderr'] or 0):.1f} % against the full run's "
                    f"{100 * full['accuracy']:.1f} ± {100 * (full['stderr'] or 0):.1f} %, a margin of {margin:.1f} "
                    f"points to the target against a standard error of the difference of {se:.1f}: use about "
                    f"{math.ceil((2 * se / max(margin, 0.5)) ** 2)} x as many samples")
    if target.max_accuracy_drop is None:
        rivals = [r for r in ran(rows) if r is not chosen and meets(r, full, target)
                  and 100 * abs(r["accuracy"] - chosen["accuracy"]) < 2 * 100 * math.hypot(r["stderr"] or 0, chosen["stderr"] or 0)]
        if rivals:
            return (f"{len(rivals)} other plan(s) meeting the target are within two standard errors of the chosen "
                    f"plan's accuracy ({100 * chosen['accuracy']:.1f} ± {100 * (chosen['stderr'] or 0):.1f} %): the "
                    "calibration set cannot rank them; use more samples")
    return None

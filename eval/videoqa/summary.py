"""The summary of a video-QA run: per plan accuracy (overall and per type, with standard errors),
retention against the full plan, kept tokens, FLOPs, times, KV bytes, failures; as CSV, Markdown
and two plots (accuracy against kept tokens and against prefill time, one line per pruner).

Token counts are means over the samples that ran, rounded to whole tokens. Times are per sample: each
padded batch's time shared evenly among its samples (``prefill_s = batch_prefill_s / batch_size``), so
they add up to the run's time, not to what one sample would take alone."""
from __future__ import annotations

import csv
import math
import os

COLUMNS = ("plan", "samples", "failures", "accuracy", "stderr", "retention", "kept_tokens", "visual_tokens",
           "prefill_flops", "prefill_s", "decode_s", "kv_cache_bytes")
TOKENS = ("kept_tokens", "visual_tokens")  # counts: whole numbers
TIMES_NOTE = ("prefill s, decode s: per sample, its padded batch's time shared evenly "
              "(a record's batch_prefill_s / batch_size, batch_decode_s / batch_size).")


def short(plan: str) -> str:
    """A plan's short label: "full", or its stages as pruner@keep."""
    if not plan:
        return "full"
    parts = []
    for stage in plan.split(";"):
        name, _, opts = stage.partition(":")
        keep = next((o.split("=", 1)[1] for o in opts.split(",") if o.startswith("keep=")), "")
        parts.append(f"{name}@{keep}")
    return "+".join(parts)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _acc(records: list[dict]) -> tuple[float | None, float | None]:
    """(accuracy, its standard error sqrt(p (1 - p) / n)) over records that ran."""
    n = len(records)
    if not n:
        return None, None
    p = sum(bool(r["correct"]) for r in records) / n
    return p, math.sqrt(p * (1 - p) / n)


def rows(records: list[dict], plans: list[str]) -> list[dict]:
    """One row per plan, in the order given; accuracy over the samples that ran (failures apart)."""
    by_plan = {p: [r for r in records if r["plan"] == p] for p in plans}
    types = sorted({r["type"] for r in records if r["type"]})
    full_acc, _ = _acc([r for r in by_plan.get("", []) if not r["error"]])
    out = []
    for plan, recs in by_plan.items():
        ran = [r for r in recs if not r["error"]]
        acc, se = _acc(ran)
        row = dict(plan=plan or "(full)", samples=len(recs), failures=len(recs) - len(ran), accuracy=acc, stderr=se,
                   retention=acc / full_acc if acc is not None and full_acc else None)
        for key in COLUMNS[6:]:
            row[key] = _mean(r.get(key) for r in ran)
            if key in TOKENS and row[key] is not None:
                row[key] = round(row[key])
        for t in types:
            row[f"accuracy/{t}"], row[f"stderr/{t}"] = _acc([r for r in ran if r["type"] == t])
        out.append(row)
    return out


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return ""
    if pct:
        return f"{100 * v:.1f}"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1000 or abs(v) < 0.01 else f"{v:.3f}"
    return str(v)


def markdown(table: list[dict]) -> str:
    types = sorted({k.split("/", 1)[1] for row in table for k in row if k.startswith("accuracy/")})
    head = ["plan", "samples", "failures", "accuracy % (± se)", "retention %", *[f"{t} %" for t in types],
            "kept tokens", "visual tokens", "prefill FLOPs", "prefill s (shared)", "decode s (shared)", "KV bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [f"`{r['plan']}`", str(r["samples"]), str(r["failures"]),
                 f"{_fmt(r['accuracy'], True)} ± {_fmt(r['stderr'], True)}" if r["accuracy"] is not None else "",
                 _fmt(r["retention"], True)]
        cells += [f"{_fmt(r.get(f'accuracy/{t}'), True)} ± {_fmt(r.get(f'stderr/{t}'), True)}"
                  if r.get(f"accuracy/{t}") is not None else "" for t in types]
        cells += [_fmt(r[k]) for k in COLUMNS[6:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: list[dict], x: str, path: str) -> None:
    """Accuracy against ``x`` (kept_tokens or prefill_s), one line per pruner, the full plan dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list] = {}
    for r in table:
        if r["accuracy"] is None or r[x] is None:
            continue
        if r["plan"] == "(full)":
            ax.axhline(100 * r["accuracy"], color="black", linestyle="--", label="all tokens")
            ax.plot([r[x]], [100 * r["accuracy"]], "k*", markersize=10)
            continue
        stages = r["plan"].split(";")
        name = stages[0].split(":")[0] if len(stages) == 1 else short(r["plan"])
        groups.setdefault(name, []).append((r[x], 100 * r["accuracy"]))
    for n, (name, pts) in enumerate(sorted(groups.items())):
        pts.sort()
        ax.plot([p for p, _ in pts], [a for _, a in pts], marker="o", label=name, color=plt.cm.tab10(n % 10))
    ax.set(xlabel={"kept_tokens": "visual tokens kept (mean)",
                   "prefill_s": "prefill time per sample (s, mean; each batch's time / its size)"}[x],
           ylabel="accuracy (%)", title="video QA: accuracy against " + ("kept tokens" if x == "kept_tokens" else "prefill time"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(records: list[dict], plans: list[str], out: str, notes: list[str] = ()) -> str:
    """summary.csv, summary.md (``notes``: lines under its title) and the two plots in ``out``; returns the
    Markdown table."""
    table = rows(records, plans)
    keys = list(dict.fromkeys(k for r in table for k in r))
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(table)
    text = markdown(table)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Video QA: {len(plans)} plan(s), {max((r['samples'] for r in table), default=0)} samples\n\n"
                "Accuracy over the samples that ran (failures apart); retention = accuracy / the full plan's; "
                "means over the samples that ran; token counts rounded to whole tokens.\n\n" + TIMES_NOTE + "\n\n"
                + "".join(f"{n}\n\n" for n in notes) + text + "\n")
    try:
        plot(table, "kept_tokens", os.path.join(out, "accuracy.png"))
        plot(table, "prefill_s", os.path.join(out, "accuracy_prefill.png"))
    except ImportError:  # matplotlib is an extra
        import sys
        print("no plots: pip install matplotlib (tokensieve[eval])", file=sys.stderr)
    return text

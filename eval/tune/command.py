"""Choosing a plan for a target: ``tokensieve tune`` (also ``python -m tokensieve.eval.tune``).

    tokensieve tune --max-accuracy-drop 1 --out runs/tune               # the world's calibration videos
    tokensieve tune --latency-ms 40 --pruners divprune,fastv --budgets 0.5,0.25,0.11 --auto mass=0.9 --out runs/t
    tokensieve tune --flops-ratio 0.3 --data calib.jsonl --format videomme --model ... --out runs/t

It measures a grid of plans on a calibration set with ``tokensieve eval`` (the same runner, records and
resume: ``--out/calibration`` is an eval folder) — pruners x budgets, pruners x ``--auto`` rules
(``keep=auto,<rule>``), and any ``--plan`` — then chooses the plan that meets the target
(``eval/tune/front.py``): ``--max-accuracy-drop`` points below the full-token run at the least prefill FLOPs,
or ``--latency-ms`` (mean measured prefill per sample) / ``--flops-ratio`` (prefill FLOPs over the full
run's) at the best accuracy.

Outputs in --out: ``tuned.yaml`` (a plan file every command takes: ``--plan runs/t/tuned.yaml``),
``front.md`` / ``front.csv`` (every plan: accuracy ± standard error, drop, FLOPs ratio, prefill ms, on the
Pareto front of accuracy against FLOPs and against time, the chosen one marked), ``front.png`` (both fronts,
the chosen point starred) and ``command.txt`` (the command line that reproduces the choice). The same command
again resumes the sweep. Check the choice on a held-out set: ``tokensieve eval --plan runs/t/tuned.yaml``
(with no ``--data``, eval's own world videos: another seed than the calibration set's).
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys

from ...engine.errors import TokenSieveError
from ...engine.plan import Plan, default_place
from ..videoqa import command as eval_command, summary
from ..videoqa.readers import DataError, read_samples
from ..videoqa.runner import load_records
from . import front

DEFAULT_PRUNERS = "divprune,fastv,dycoke"
DEFAULT_BUDGETS = "0.5,0.25,0.11,0.05"
CALIBRATION_SEED = 30_000  # the world's calibration videos (eval's own default set is seed 20 000: held out)
CALIBRATION_VIDEOS = 32
MIN_SAMPLES = 10  # below this, a standard error is up to 50 / sqrt(n) > 15 points: nothing can be ranked
FORWARDED = ("format", "video_root", "model", "nframes", "fps", "batch_size", "limit", "max_new_tokens", "video_mode",
             "device", "dtype")


def grid(pruners: str, budgets: str, autos: list[str], plans: list[str]) -> list[str]:
    """The plans of the sweep after the full one: ``plans``, pruners x budgets, pruners x auto rules
    (``"mass=0.9"`` -> ``"<pruner>:keep=auto,mass=0.9"``), normalised; PlanError for a bad one (no work done)."""
    out = eval_command.expand_plans(plans, pruners if budgets else None, budgets or None)
    for rule in autos:
        out += [str(Plan.parse(default_place(p.strip(), f"auto,{rule}", eval_command.LLM_LAYER)))
                for p in pruners.split(",")]
    return list(dict.fromkeys(out))


def calibration_set(out: str) -> str:
    """The world's calibration videos, written once under ``out/world-calibration``."""
    from ..shapeworld import dataset

    folder = os.path.join(out, "world-calibration")
    path = os.path.join(folder, "dataset.jsonl")
    if not os.path.exists(path):
        dataset.write_dataset(folder, n_images=0, n_videos=CALIBRATION_VIDEOS, seed=CALIBRATION_SEED, progress=True)
    return path


def eval_argv(args, data: str, plans: list[str]) -> list[str]:
    """The ``tokensieve eval`` arguments of the sweep (into ``--out/calibration``)."""
    argv = ["--data", data, "--out", os.path.join(args.out, "calibration")]
    for p in plans:
        argv += ["--plan", p]
    for name in FORWARDED:
        v = getattr(args, name)
        if v is not None and v is not False:
            argv += [f"--{name.replace('_', '-')}", str(v)]
    return argv + (["--force"] if args.force else [])


def table(rows: list[dict], chosen: dict | None) -> list[dict]:
    """The front table: one row per plan, with its drop, FLOPs ratio and front memberships."""
    full = front.full_row(rows)
    on = {c: {r["plan"] for r in front.pareto(rows, c)} for c in ("prefill_flops", "prefill_s")}
    out = []
    for r in front.ran(rows):
        out.append(dict(plan=r["plan"], accuracy=round(100 * r["accuracy"], 2), stderr=round(100 * (r["stderr"] or 0), 2),
                        drop=round(100 * (full["accuracy"] - r["accuracy"]), 2), kept_tokens=r["kept_tokens"],
                        flops_ratio=round(r["prefill_flops"] / full["prefill_flops"], 4),
                        prefill_ms=round(1000 * r["prefill_s"], 2), front_flops=r["plan"] in on["prefill_flops"],
                        front_time=r["plan"] in on["prefill_s"], chosen=chosen is not None and r["plan"] == chosen["plan"]))
    return sorted(out, key=lambda r: r["flops_ratio"])


def markdown(tab: list[dict], header: str) -> str:
    lines = [header, "", "| plan | accuracy % (± se) | drop (points) | kept tokens | FLOPs x full | prefill ms | "
             "front: FLOPs | front: time |", "|---|---|---|---|---|---|---|---|"]
    for r in tab:
        mark = " **(chosen)**" if r["chosen"] else ""
        lines.append(f"| `{r['plan']}`{mark} | {r['accuracy']:.1f} ± {r['stderr']:.1f} | {r['drop']:+.1f} | "
                     f"{r['kept_tokens']} | {r['flops_ratio']:.3f} | {r['prefill_ms']:.1f} | "
                     f"{'yes' if r['front_flops'] else ''} | {'yes' if r['front_time'] else ''} |")
    return "\n".join(lines) + "\n"


def plot(tab: list[dict], path: str) -> None:
    """Accuracy against FLOPs ratio and against prefill ms: every plan, the front joined, the chosen starred."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, x, on, label in ((axes[0], "flops_ratio", "front_flops", "prefill FLOPs / the full run's"),
                             (axes[1], "prefill_ms", "front_time", "prefill per sample (ms, measured)")):
        ax.scatter([r[x] for r in tab], [r["accuracy"] for r in tab], color="tab:gray", s=18, label="plans")
        f = sorted((r for r in tab if r[on]), key=lambda r: r[x])
        ax.plot([r[x] for r in f], [r["accuracy"] for r in f], "o-", color="tab:blue", label="Pareto front")
        for r in tab:
            if r["chosen"]:
                ax.plot([r[x]], [r["accuracy"]], "*", color="tab:red", markersize=16, label=f"chosen: {summary.short(r['plan'])}")
            if r["plan"] == front.FULL:
                ax.axhline(r["accuracy"], color="black", linestyle="--", linewidth=0.8, label="all tokens")
        ax.set(xlabel=label, title=f"accuracy against {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plan(path: str, chosen: dict, target: front.Target, command: str, samples: int) -> None:
    """tuned.yaml: the chosen plan's stages (``Plan.parse`` reads the file), with what it was tuned for."""
    import yaml

    plan = Plan.parse("" if chosen["plan"] == front.FULL else chosen["plan"])
    doc = {"tuned_for": target.describe(), "calibration_samples": samples,
           "accuracy": round(100 * chosen["accuracy"], 2), "prefill_s": chosen["prefill_s"],
           "command": command, "stages": plan.stage_dicts()}
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="tokensieve tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    t = ap.add_mutually_exclusive_group(required=True)
    t.add_argument("--max-accuracy-drop", type=float, help="points below the full-token run's accuracy, at least cost")
    t.add_argument("--latency-ms", type=float, help="mean measured prefill per sample, at the best accuracy")
    t.add_argument("--flops-ratio", type=float, help="prefill FLOPs over the full run's, at the best accuracy")
    ap.add_argument("--pruners", default=DEFAULT_PRUNERS, help=f"comma-separated (default {DEFAULT_PRUNERS})")
    ap.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"comma-separated ratios (default {DEFAULT_BUDGETS})")
    ap.add_argument("--auto", action="append", default=[], help="an adaptive rule tried with every pruner, e.g. "
                    "mass=0.9 or tau=0.2 (repeatable; keep=auto,<rule>)")
    ap.add_argument("--plan", action="append", default=[], help="another plan to try (repeatable)")
    ap.add_argument("--data", help="the calibration set: any file tokensieve eval reads (default: the world's "
                    f"{CALIBRATION_VIDEOS} calibration videos, seed {CALIBRATION_SEED})")
    ap.add_argument("--out", default=os.path.join("runs", "tune"), help="output folder (default ./runs/tune; resumes)")
    ap.add_argument("--format", default=None)
    ap.add_argument("--video-root")
    ap.add_argument("--model", help="as tokensieve eval (default: the embedded tiny-llava)")
    ap.add_argument("--nframes", type=int)
    ap.add_argument("--fps", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--video-mode", choices=("native", "frames"))
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--force", action="store_true", help="start the calibration sweep over when it differs")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    try:
        return _main(args, argv)
    except (TokenSieveError, ValueError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args, argv: list[str]) -> int:
    target = front.Target(args.max_accuracy_drop, args.latency_ms, args.flops_ratio)  # ValueError: nothing runs
    plans = grid(args.pruners, args.budgets, args.auto, args.plan)
    if args.data is not None and not os.path.exists(args.data):
        raise DataError(f"calibration set not found: {args.data}")
    data = args.data or calibration_set(args.out)
    n = len(read_samples(data, args.format or "auto", args.video_root, args.limit))
    if n < MIN_SAMPLES:
        raise DataError(f"the calibration set has {n} sample(s): too few to rank plans (a standard error of up to "
                        f"{50 / max(n, 1) ** 0.5:.0f} accuracy points); give at least {MIN_SAMPLES}")
    print(f"tune: {len(plans)} plans (and the full one) on {n} calibration samples; target: {target.describe()}",
          file=sys.stderr)
    rc = eval_command.main(eval_argv(args, data, plans))
    again = "tokensieve tune " + shlex.join(argv)
    if rc == 130:
        print(f"the sweep resumes with: {again}", file=sys.stderr)
    if rc:
        return rc
    wanted = [""] + plans
    records = [r for r in load_records(os.path.join(args.out, "calibration", "samples.jsonl")) if r["plan"] in wanted]
    rows = summary.rows(records, wanted)
    try:
        chosen, failure = front.choose(rows, target), None
    except front.NoPlanMeets as e:
        chosen, failure = None, str(e)
    tab = table(rows, chosen)
    warning = chosen and front.ranking_warning(rows, chosen, target)
    header = (f"# Tuned for: {target.describe()}\n\n{n} calibration samples ({data}); `{again}`"
              + (f"\n\nNo plan meets the target: {failure}" if failure else "")
              + (f"\n\nWarning: {warning}" if warning else ""))
    with open(os.path.join(args.out, "front.md"), "w") as f:
        f.write(markdown(tab, header))
    with open(os.path.join(args.out, "front.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(tab[0]))
        w.writeheader()
        w.writerows(tab)
    plot(tab, os.path.join(args.out, "front.png"))
    with open(os.path.join(args.out, "command.txt"), "w") as f:
        f.write(again + "\n")
    if failure:
        print(f"error: {failure} (every plan: {os.path.join(args.out, 'front.md')})", file=sys.stderr)
        return 2
    write_plan(os.path.join(args.out, "tuned.yaml"), chosen, target, again, n)
    print(markdown(tab, header))
    full = front.full_row(rows)
    print(f"chosen: {chosen['plan']} — accuracy {100 * chosen['accuracy']:.1f} ± {100 * (chosen['stderr'] or 0):.1f} % "
          f"(full {100 * full['accuracy']:.1f} %), {chosen['prefill_flops'] / full['prefill_flops']:.3f} x the FLOPs, "
          f"{1000 * chosen['prefill_s']:.1f} ms prefill per sample")
    if warning:
        print(f"warning: {warning}")
    print(f"plan: {os.path.join(args.out, 'tuned.yaml')} (check it on held-out data: tokensieve eval --plan "
          f"{os.path.join(args.out, 'tuned.yaml')} --out <folder>)")
    return 0

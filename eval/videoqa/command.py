"""The batch video-QA evaluation: ``tokensieve eval`` (also ``python -m tokensieve.eval.videoqa``).

    tokensieve eval --data videomme.json --video-root /data/videomme --format videomme \\
        --model llava-hf/llava-onevision-qwen2-7b-ov-hf --plan "" --plan "dycoke:keep=0.25" --out runs/vmme
    tokensieve eval --data mine.jsonl --pruners fastv,visionzip --budgets 0.25,0.11 --nframes 16 --out runs/grid
    tokensieve eval --out runs/world            # no --data, no --model: the embedded world's videos, offline

Every plan runs on every sample; the full-token plan always runs too (retention is measured
against it). Samples go through ``generate_batch`` in padded batches; each chunk's videos are
decoded once, in a background pool, while the chunk before runs, and shared by every plan.

Outputs in --out: ``samples.jsonl`` (one line per sample and plan, written and flushed as each
batch ends), ``summary.csv`` / ``summary.md`` (per plan: accuracy overall and per type with its
standard error, retention, kept tokens, FLOPs, times, KV bytes, failures), ``accuracy.png``
(accuracy against kept tokens) and ``accuracy_prefill.png`` (against prefill time), and
``config.json``. Times per sample (``prefill_s``, ``decode_s``) are its padded batch's shared
evenly (``batch_prefill_s / batch_size``; the batch's own times are recorded too).

The same command again resumes ("resuming: N of M done"): (id, plan) pairs already in
``samples.jsonl`` are skipped, a line torn by a kill is dropped; another configuration in the same
folder is refused (``--force`` starts over). Ctrl-C stops with one line (what was saved, the command
that resumes) and exit status 130. A sample that cannot run (missing field, unreadable video, ...)
is written with its ``error`` and counted as a failure; the run goes on; a ``--format`` under which no
record parses stops before any work.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass, field

from ...engine.errors import TokenSieveError
from ...engine.plan import Plan, default_place
from . import runner, summary
from .readers import FORMATS, DataError, read_samples
from .runner import RECORD_FIELDS, load_records  # noqa: F401 - the record layout and resume, re-exported
RESUME_KEYS = ("data", "format", "video_root", "model", "plans", "nframes", "fps", "max_new_tokens", "video_mode")
WORLD_VIDEOS = 32  # the embedded default set: held-out world videos (seed 20 000), about 4 questions each
DEFAULT_PLANS = ["uniform:keep=0.25", "dycoke:keep=0.25"]
LLM_LAYER = 2  # --pruners: an LLM-stage pruner prunes before this layer (FastV's K)


# ---- configuration --------------------------------------------------------------------------------
def expand_plans(plans: list[str], pruners: str | None, budgets: str | None) -> list[str]:
    """The full plan first, then the given plans and the grid ``pruners x budgets``, normalised, no repeats."""
    out = [""] + [p for p in plans]
    if pruners or budgets:
        if not (pruners and budgets):
            raise DataError("--pruners and --budgets go together (a grid of plans)")
        try:
            grid = [float(b) for b in budgets.split(",")]
        except ValueError:
            raise DataError(f"--budgets must be comma-separated ratios in (0, 1], got {budgets!r}") from None
        out += [default_place(p.strip(), b, LLM_LAYER) for p in pruners.split(",") for b in grid]
    normalised = [str(Plan.parse(p or None)) for p in out]  # PlanError for a bad one, before any work
    return list(dict.fromkeys(normalised))


def world_dataset(out: str) -> str:
    """The embedded default set, written once under ``out/world`` (held-out seed 20 000)."""
    from ..shapeworld import dataset

    path = os.path.join(out, "world", "dataset.jsonl")
    if not os.path.exists(path):
        dataset.write_dataset(os.path.join(out, "world"), n_images=0, n_videos=WORLD_VIDEOS, seed=20_000, progress=True)
    return path


def check_config(out: str, config: dict, force: bool) -> bool:
    """Refuse to mix two configurations in one folder. Returns whether the folder holds another run that
    ``force`` starts over (its outputs are dropped by ``write_config``). Writes nothing."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return False
    try:
        old = json.load(open(path))
    except ValueError:
        old = {}
    diff = [k for k in RESUME_KEYS if old.get(k) != config.get(k)]
    if diff and not force:
        raise DataError(f"{out} holds a run with another configuration ({', '.join(diff)} differ: "
                        f"{', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use another --out, or --force to start over")
    return bool(diff)


def write_config(out: str, config: dict, start_over: bool) -> None:
    """config.json in ``out``; ``start_over`` first drops the outputs of the run the folder held."""
    os.makedirs(out, exist_ok=True)
    for name in ("samples.jsonl", "summary.csv", "summary.md") if start_over else ():
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


@dataclass
class Progress:
    """What a run has to do, filled in by ``_main`` as it learns it (for the line Ctrl-C prints):
    ``path``: its samples.jsonl; ``wanted``: the (id, plan) pairs of this run."""

    path: str
    wanted: set = field(default_factory=set)

    def saved(self) -> int:
        """How many of the wanted pairs samples.jsonl holds now."""
        return len({(r["id"], r["plan"]) for r in load_records(self.path)} & self.wanted)


def interrupted(progress: Progress, argv: list[str]) -> str:
    """The one line a Ctrl-C prints: what was saved, and the command that resumes."""
    again = "tokensieve eval " + shlex.join(argv)
    if not progress.wanted:
        return f"interrupted before any sample ran; run again with: {again}"
    return (f"interrupted: {progress.saved()} of {len(progress.wanted)} samples x plans saved in {progress.path}; "
            f"resume with: {again}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="tokensieve eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="the benchmark's annotation file (default: the embedded world's videos)")
    ap.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    ap.add_argument("--video-root", help="folder the video paths are relative to (default: the data file's)")
    ap.add_argument("--model", help="hub id, local checkpoint or shipped model (tiny-llava, tiny-qwen2-vl; default: "
                    "the embedded tiny-llava)")
    ap.add_argument("--plan", action="append", default=[], help="a plan (repeatable); the full plan always runs; "
                    "keep=auto chooses each sample's budget, e.g. 'divprune:keep=auto,tau=0.2' (samples.jsonl: "
                    "budgets)")
    ap.add_argument("--pruners", help="grid: comma-separated pruners, each at every --budgets ratio")
    ap.add_argument("--budgets", help="grid: comma-separated ratios, e.g. 0.25,0.11")
    ap.add_argument("--out", required=True, help="output folder (resumes when it holds the same run)")
    ap.add_argument("--nframes", type=int, help="frames sampled per video (default 8)")
    ap.add_argument("--fps", type=float, help="sample videos at this rate instead (qwen-vl-utils rules)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, help="the first N samples only")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--video-mode", default="native", choices=("native", "frames"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--force", action="store_true", help="start the --out folder over when its run differs")
    ap.add_argument("--executor", default="local", choices=("local", "ray"),
                    help="local: this process; ray: Ray Data actors, one engine each (pip install 'tokensieve[ray]')")
    ap.add_argument("--ray-address", help="a running Ray cluster (e.g. auto, ray://head:10001); default: start one")
    ap.add_argument("--workers", type=int, default=1, help="Ray: engine actors (one per GPU on a GPU cluster)")
    ap.add_argument("--gpus-per-worker", type=float, default=0, help="Ray: GPUs each engine actor holds")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    progress = Progress(os.path.join(args.out, "samples.jsonl"))
    try:
        return _main(args, progress)
    except TokenSieveError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (flushed per batch); say how to go on
        if args.debug:
            raise
        print(interrupted(progress, argv), file=sys.stderr)
        return 130


def _main(args, progress: Progress) -> int:
    import tokensieve

    if args.nframes is not None and args.fps is not None:
        raise DataError("give --nframes or --fps, not both")
    if args.executor == "ray":
        from .ray_runner import import_ray
        import_ray()  # not installed: says how, before any work
    for name in ("batch_size", "limit", "max_new_tokens", "nframes", "workers"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise DataError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.gpus_per_worker < 0:
        raise DataError(f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}")
    asked = args.plan or args.pruners or args.data or args.model
    plans = expand_plans(args.plan if asked else DEFAULT_PLANS, args.pruners, args.budgets)
    data = args.data or world_dataset(args.out)
    samples = read_samples(data, args.format, args.video_root, args.limit)  # DataError: nothing runs
    inside = os.path.abspath(data).startswith(os.path.abspath(args.out) + os.sep)  # the world set: portable
    config = dict(data=os.path.relpath(data, args.out) if inside else os.path.abspath(data), format=args.format,
                  video_root=args.video_root, model=args.model or "default", plans=plans, nframes=args.nframes, fps=args.fps,
                  max_new_tokens=args.max_new_tokens, video_mode=args.video_mode, batch_size=args.batch_size,
                  limit=args.limit, samples=len(samples))
    start_over = check_config(args.out, config, args.force)
    path, wanted = progress.path, {(s.id, p) for s in samples for p in plans}
    done = set() if start_over else {(r["id"], r["plan"]) for r in load_records(path)}
    if done & wanted:
        print(f"resuming: {len(done & wanted)} of {len(wanted)} done ({path})", file=sys.stderr)
    progress.wanted = set() if start_over else wanted  # the folder's old run is not this one's until begin()

    def begin():  # the folder is this run's from here on
        write_config(args.out, config, start_over)
        progress.wanted = wanted

    bad = [s for s in samples if s.error]
    if bad:
        print(f"{len(bad)} sample(s) cannot run (recorded with their error), e.g. {bad[0].error}", file=sys.stderr)
    left, total = runner.todo(samples, plans, done)
    settings = runner.RunSettings(args.batch_size, args.max_new_tokens, args.nframes, args.fps)
    load_kwargs = dict(model=args.model, device=args.device, dtype=args.dtype, video_mode=args.video_mode,
                       max_new_tokens=args.max_new_tokens)
    notes = []
    if not left:
        begin()
    elif args.executor == "ray":
        from . import ray_runner

        with runner.RecordWriter(path, plans, total) as writer:
            stats = ray_runner.evaluate(left, plans, done, settings, writer, load_kwargs, args.workers,
                                        args.gpus_per_worker, args.ray_address,
                                        on_checked=begin)
        notes.append(f"Ray executor, {args.workers} worker(s): {stats['retried']} sample(s) retried after a worker died.")
    else:
        engine = tokensieve.load(**load_kwargs)
        try:
            for plan in plans:  # a plan that cannot run on this model stops here, before anything is written
                engine.check_plan(plan)
            begin()
            with runner.RecordWriter(path, plans, total) as writer:
                runner.evaluate(engine, left, plans, done, settings, writer)
        finally:
            engine.close()
    ids = {s.id for s in samples}
    records = [r for r in load_records(path) if r["id"] in ids and r["plan"] in plans]
    print(summary.write(records, plans, args.out, notes))
    return 0

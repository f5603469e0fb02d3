"""Command line: ``tokensieve run`` answers a question about an image, one row per plan;
``tokensieve eval`` is the batch video-QA evaluation (``eval/videoqa/command.py``).

    tokensieve run --image scene.png --prompt "what colour is the circle?" \
        --plan "" --plan "fastv:layer=2,keep=0.25"
    tokensieve run --model llava-hf/llava-1.5-7b-hf --image photo.jpg --prompt "..." --json

With no --model the embedded default model is used; with no --plan, the full model and a
25% uniform budget run side by side. ``--video clip.mp4 [--nframes N | --fps F]`` asks about a video.
"""
from __future__ import annotations

import argparse
import json
import sys

DEFAULT_PLANS = ["", "uniform:keep=0.25"]
RUN_DESCRIPTION = """Answer a question about images or a video under one or more pruning plans, one row each.

With no --model the embedded default, tiny-llava (2.2 M parameters), answers in one word about its synthetic
shape world only: 1-8 shapes (circle, square, triangle, star, cross) in red, green, blue, yellow, orange,
purple or white, on grey or grey-noise backgrounds; questions of colour, shape, count, "is there a ...",
position (left / right, top / bottom, quadrant) and, for videos, what appeared, in what order and how many.
Words of the question it was never trained on are named in a note ("not understood: shapes"): it ignores
them. Give --model a real checkpoint (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-2B-Instruct, ...) for photos."""
VIDEO_STATS = ["frames", "frame_indices", "frame_times", "tokens_per_frame", "scoring_s", "scoring_flops"]
STAT_COLUMNS = ["visual_tokens", "kept_tokens", "prefill_flops", "kv_cache_bytes", "prefill_s", "decode_s", "new_tokens"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int) and v >= 10_000:
        return f"{v:.3g}"
    return str(v)


def table(rows: list[dict]) -> str:
    cols = ["plan", "answer"] + STAT_COLUMNS
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def budget_lines(row: dict) -> list[str]:
    """One line per keep=auto stage of a row (per image at a vision-tower stage): "budget: <plan> stage 0
    divprune tau=0.2 -> 39 of 64 tokens (reached 0.198)", with the bound that clipped it and, for a vision-tower
    stage's record, the image it is of ("image 1")."""
    out = []
    for b in row.get("budgets", ()):
        rule = b["rule"] if b["value"] is None else f"{b['rule']}={b['value']:g}"
        reached = "" if b["reached"] is None else f" (reached {b['reached']:.3g})"
        clipped = "" if b["clipped"] is None else f", clipped by {b['clipped']} (rule's budget {b['budget']})"
        image = f" image {b['image']}" if b.get("image") is not None else ""
        out.append(f"budget: {row['plan']} stage {b['stage']}{image} {b['pruner']} {rule} -> {b['kept']} of "
                   f"{b['entering']} tokens{reached}{clipped}")
    return out


def run(args) -> int:
    import tokensieve

    from tokensieve.engine.request import check_priority, load_image
    from tokensieve.engine.video import decode_video

    plans = args.plan if args.plan else DEFAULT_PLANS
    try:
        parsed = [tokensieve.Plan.parse(p or None) for p in plans]
        for plan in parsed:  # the command line gives no token priorities: a plan that reads them fails here
            check_priority(None, plan)
        for i, path in enumerate(args.image):  # bad files fail before the model loads
            load_image(path, f"image {i}")
        video = None
        if args.video is not None:  # decoded once, before the model loads, and shared by every plan
            spec = {"path": args.video, **({"nframes": args.nframes} if args.nframes is not None else {}),
                    **({"fps": args.fps} if args.fps is not None else {})}
            video = decode_video(spec, default_nframes=8)
        engine = tokensieve.load(args.model, device=args.device, dtype=args.dtype, video_mode=args.video_mode)
        rows = []
        for plan in parsed:
            res = engine.generate(args.prompt, images=args.image, video=video, plan=plan,
                                  max_new_tokens=args.max_new_tokens)
            row = {"plan": str(plan) or "(none)", "answer": res.text}
            row.update({k: res.stats[k] for k in STAT_COLUMNS})
            row["per_layer_kv_len"] = res.stats["per_layer_kv_len"]
            row["kept"] = [k.tolist() for k in res.kept]
            row.update({k: res.stats[k] for k in VIDEO_STATS if k in res.stats})
            if "budgets" in res.stats:  # keep=auto stages: the budget each chose, and why
                row["budgets"] = res.stats["budgets"]
            rows.append(row)
    except tokensieve.TokenSieveError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if video is not None and video.truncated:
        print(f"warning: {args.video} ends before its header says: {video.frames_usable} decodable frame(s), "
              "sampled from those", file=sys.stderr)
    unknown = res.unknown_words  # the same question in every row
    if args.json:
        print(json.dumps({"model": args.model or "default", "prompt": args.prompt, "unknown_words": unknown,
                          "results": rows}, indent=1))
    else:
        print(table(rows))
        for row in rows:
            for line in budget_lines(row):
                print(line)
        if unknown:
            print(f"note: not understood: {', '.join(unknown)} (words the model was never trained on; it ignores them)")
    return 0


def family_line(pruner) -> str:
    """Where ``pruner`` runs, per registered family: runs, runs with a surrogate (naming the signal), refused (why)."""
    from tokensieve.engine.adapters import ADAPTERS
    from tokensieve.engine.fit import runs_on, surrogates

    refused = {f: r for f, r in runs_on(pruner).items() if r}
    runs = [f + (f" (surrogate for {', '.join(surrogates(ADAPTERS[f], pruner))})" if surrogates(ADAPTERS[f], pruner)
                 else "") for f in ADAPTERS if f not in refused]
    out = ", ".join(runs) if runs else "none"
    if refused:
        out += f"; refused on {', '.join(refused)}: {next(iter(refused.values())).split(';')[0]}"
    return out


def pruners() -> int:
    """``tokensieve pruners``: every registered pruner, where it acts, and its options (type, range, default)."""
    from tokensieve.pruners import REGISTRY

    for name in sorted(REGISTRY):
        p = REGISTRY[name]()
        keep = "" if p.default_keep is None else f", default keep {p.default_keep}"
        layer = "" if p.default_layer is None else f", default layer {p.default_layer}"
        doc = " ".join((sys.modules[type(p).__module__].__doc__ or "").strip().split("\n\n")[0].split())
        doc = doc.removeprefix(f"`{name}`: ")
        print(f"{name}: {doc if len(doc) <= 110 else doc[:107] + '...'}")
        print(f"    where: {', '.join(p.wheres)} (default {p.default_where}{layer}{keep})"
              + (", needs a CLS token" if p.requires_tower else
                 ", needs a hooked vision tower" if p.signals.of("tower", required=True) else "")
              + (", scores (keep=auto,mass=)" if p.scored else ""))
        if p.signals.reads:
            print(f"    reads: {', '.join(sorted(p.signals.reads))}")
        print(f"    families: {family_line(p)}")
        for opt, spec in p.options.items():
            print(f"    {opt}: {spec.describe()}")
    print("\n  keep is a count, a ratio, or auto: a budget chosen per request by a rule (engine/budget.py, docs/api.md):\n"
          "    keep=auto,tau=T   redundancy, any pruner: tokens until the next is within cosine distance T of those\n"
          "                      kept (T in (0, 2]; a video: per frame, the tokens that changed since the frame before)\n"
          "    keep=auto,mass=M  importance mass, pruners marked 'scores': the fewest tokens with M of the score mass\n"
          "    min=, max=        bounds, a count or a ratio; plain keep=auto: an adaptive pruner's own rule (prumerge)\n"
          "    (a pruner with its own option of that name takes budget_tau= etc.; not at where=vision)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # the batch video-QA evaluation has its own options
        from tokensieve.eval.videoqa import main as videoqa_main
        return videoqa_main(argv[1:])
    if argv[:1] == ["bench"]:  # the speed benchmark has its own options
        from tokensieve.eval.bench import main as bench_main
        return bench_main(argv[1:])
    if argv[:1] == ["tune"]:  # choosing a plan for a target has its own options
        from tokensieve.eval.tune import main as tune_main
        return tune_main(argv[1:])
    if argv[:1] == ["demo"]:  # the Gradio demo has its own options
        from tokensieve.demos.app import main as demo_main
        return demo_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tokensieve", description="Visual-token pruning for VLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("eval", help="batch video-QA evaluation of plans (tokensieve eval --help)", add_help=False)
    sub.add_parser("demo", help="the Gradio demo: budgets side by side (tokensieve demo --help)", add_help=False)
    sub.add_parser("tune", help="choose the plan that meets an accuracy, latency or FLOPs target (tokensieve tune "
                   "--help)", add_help=False)
    sub.add_parser("pruners", help="list the pruners, where they act and their options")
    sub.add_parser("bench", help="measured speed of plans against the FLOP ideal (tokensieve bench --help)",
                   add_help=False)
    p = sub.add_parser("run", help="answer a question about images/video under one or more plans",
                       description=RUN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, local directory or shipped model (tiny-llava, tiny-qwen2-vl; "
                   "default: the embedded tiny-llava)")
    p.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    p.add_argument("--video", default=None, help="video file: mp4, webm, mkv, avi, mov (needs tokensieve[video])")
    p.add_argument("--nframes", type=int, default=None, help="frames to sample from --video (default 8)")
    p.add_argument("--fps", type=float, default=None, help="sample --video at this rate instead (qwen-vl-utils rules)")
    p.add_argument("--video-mode", default="native", choices=["native", "frames"],
                   help="native: the family's own video input where it has one; frames: a sequence of images")
    p.add_argument("--prompt", required=True)
    p.add_argument("--plan", action="append", default=[],
                   help="pruning plan, e.g. 'fastv:layer=2,keep=0.25' (repeatable; '' = no pruning); keep=auto "
                        "chooses the budget per request: 'divprune:keep=auto,tau=0.2' (redundancy), "
                        "'fastv:layer=2,keep=auto,mass=0.9' (importance mass), bounds min= / max= (docs/api.md)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    return pruners() if args.command == "pruners" else run(args)


if __name__ == "__main__":
    sys.exit(main())

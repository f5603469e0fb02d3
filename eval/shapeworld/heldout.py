"""Held-out full-token accuracy of trained tiny VLMs, per question type: the figures of issue 5's bar.

    python -m tokensieve.eval.shapeworld.heldout                       # both shipped VLMs, 512 images / 256 videos
    python -m tokensieve.eval.shapeworld.heldout runs/q14 --video-seed 30000 --out q14.json

Questions come from seeds the training never draws (images 10 000, videos 20 000: ``train_tiny``
trains on seed ``--seed`` and logs 10 000 + seed / 20 000 + seed), one question per scene or video,
20% multiple choice, in exactly the engine's prompt format (``train_tiny.tally``: the greedy answer
word after the prompt). The bar is image >= 95% and video >= 90% for each model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from tokensieve.eval.shapeworld import lossy, native_video, shipped, train_tiny

BAR = {"image": 0.95, "video": 0.90, "relevance": 0.95}  # relevance: QuoTA's per-frame yes / no question


def measure(path: str, n_images: int, n_videos: int, image_seed: int = 10_000, video_seed: int = 20_000,
            progress=None, typed: bool = False, n_relevance: int = 0, relevance_seed: int = 30_000,
            layout: str = "lattice", codec: str = "none", video_mode: str = "default") -> dict:
    """{"image" | "video": {key: {"right", "n", "accuracy"}}} for the checkpoint at ``path``; keys are
    "all", each question type, "open" and "multiple-choice". ``typed``: the same held-out scenes asked
    as people type (open questions, ``phrasing.rephrase``), under "image typed" / "video typed".
    ``n_relevance``: also that many single video frames asked QuoTA's per-frame question ("is there a X ?",
    ``train_tiny.relevance_examples``), under "relevance". ``layout="free"``: scenes and videos with objects
    anywhere (``world.random_scene`` / ``random_video``), under "image free" / "video free". ``codec`` (``lossy.CODECS``): the
    images and frames pass through it first (e.g. "mpeg4": videos as users' lossy files), under "image mpeg4" ...
    ``video_mode="native"``: each video enters as one native video (``native_video``: Qwen2-VL's temporal patches of
    two frames), under "video native"; ``"frames"``: one image a frame; ``"default"``: as the engine reads the
    model's videos (native where the processor has a video input, else frames)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    eos_id = model.config.get_text_config().eos_token_id
    native = bool(n_videos) and native_video.reads_native(proc, video_mode)
    out, media = {}, None if codec == "none" else (lambda frames: lossy.through(codec, frames))
    for kind, n, seed, batch in (("image", n_images, image_seed, 32), ("video", n_videos, video_seed, 8)):
        if n:
            right, total = train_tiny.tally(model, proc, eos_id, n, seed, video=kind == "video", batch=batch,
                                            progress=progress, typed=typed, layout=layout, media=media,
                                            native=native)
            name = " ".join([kind] + (["free"] if layout == "free" else []) + (["typed"] if typed else [])
                            + ([codec] if codec != "none" else []) + (["native"] if kind == "video" and native else []))
            out[name] = {k: {"right": right[k], "n": total[k], "accuracy": round(right[k] / total[k], 4)}
                         for k in sorted(total)}
    if n_relevance:
        right, total = train_tiny.tally(model, proc, eos_id, n_relevance, relevance_seed, video=False, batch=32,
                                        progress=progress, sampler=train_tiny.relevance_examples)
        out["relevance"] = {k: {"right": right[k], "n": total[k], "accuracy": round(right[k] / total[k], 4)}
                            for k in sorted(total)}
    return out


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per model and kind, overall accuracy with its standard error, then each type (n)."""
    lines = ["| model | kind | all (± s.e.) | bar | per type: accuracy % (n) |", "|---|---|---|---|---|"]
    for name, res in results.items():
        for kind, cells in res.items():
            a, n = cells["all"]["accuracy"], cells["all"]["n"]
            se = math.sqrt(a * (1 - a) / n)
            types = ", ".join(f"{k} {100 * c['accuracy']:.0f} ({c['n']})" for k, c in cells.items() if k != "all")
            bar = BAR[kind.split()[0]]
            met = "met" if a >= bar else "not met"
            lines.append(f"| {name} | {kind} | {100 * a:.1f} ± {100 * se:.1f} | {100 * bar:.0f}%: {met} | {types} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="checkpoint directories or shipped names (default: the shipped VLMs)")
    ap.add_argument("--images", type=int, default=512, help="held-out image questions")
    ap.add_argument("--videos", type=int, default=256, help="held-out video questions")
    ap.add_argument("--image-seed", type=int, default=10_000)
    ap.add_argument("--video-seed", type=int, default=20_000)
    ap.add_argument("--typed", action="store_true", help="ask the questions as people type them (open questions "
                    "rewritten by phrasing.rephrase: capitals, 'color', 'What is the colour of the X?', 'please')")
    ap.add_argument("--layout", choices=("lattice", "free"), default="lattice",
                    help="scenes and videos on the token lattice (the training scenes) or anywhere: continuous positions, "
                         "sizes from half a token cell to about three, touching objects, varied backgrounds")
    ap.add_argument("--relevance", type=int, default=0,
                    help="also ask this many single video frames QuoTA's per-frame question (is there a X ?), "
                         "seed 30 000; bar 95%%")
    ap.add_argument("--codec", choices=lossy.CODECS, default="none",
                    help="pass the images and frames through this first: world-mp4 (videos written as the world's "
                         "files and read back by the engine), jpeg (quality 75, 4:2:0), mpeg4 (videos as users' lossy "
                         "files: yuv420p, qscale 4; still images as jpeg)")
    native_video.add_video_mode_option(ap)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the results here (JSON), and the table beside it (.md)")
    args = ap.parse_args(argv)
    if min(args.images, args.videos, args.relevance) < 0 or args.images + args.videos + args.relevance == 0:
        ap.error("--images, --videos and --relevance must be >= 0, and not all 0")
    names = args.models or list(shipped.MODELS)
    paths = {name: shipped.resolve(name) for name in names}
    missing = [p for p in paths.values() if not os.path.isdir(p)]
    if missing:
        ap.error(f"no checkpoint directory {missing[0]}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    with tqdm(total=len(paths) * (args.images + args.videos + args.relevance), desc="held-out questions") as bar:
        for name, path in paths.items():
            results[name] = measure(path, args.images, args.videos, args.image_seed, args.video_seed, bar.update,
                                    typed=args.typed, n_relevance=args.relevance, layout=args.layout, codec=args.codec,
                                    video_mode=args.video_mode)
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"image_seed": args.image_seed, "video_seed": args.video_seed, "results": results}, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            flags = " ".join(sys.argv[1:] if argv is None else argv)
            f.write(f"Held-out full-token accuracy (images seed {args.image_seed}, videos seed {args.video_seed}; "
                    f"`python -m tokensieve.eval.shapeworld.heldout {flags}`)\n\n{table(results)}\n")
    return results


if __name__ == "__main__":
    main()

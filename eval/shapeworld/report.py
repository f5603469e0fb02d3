"""Pruning report: accuracy versus visual-token budget for every pruner, on the shipped tiny models.

    python -m tokensieve.eval.shapeworld.report                      # both shipped models, every pruner
    python -m tokensieve.eval.shapeworld.report --models llava --n-images 64 --n-videos 16 --pruners random fastv

Held-out questions (seed 10_000, never used in training) on images and 8-frame videos; each
pruner runs at its default place in the model (LLM-stage pruners at decoder layer 2 of the tiny
models' 4, ``--llm-layer``; at layer 3 the answer is already made and even random pruning keeps it:
docs/training.md, "Pruning report") with keep = 50%, 25%, 11%, 5% of the visual tokens, plus the
full-token baseline, and the oracle (``eval/shapeworld/oracle.py``: the world's ground truth picks the tokens of the
objects the question is about, then the other objects, then background) as the upper bound; a second table
gives each pruner's accuracy as a share of the oracle's.
A pruner a family cannot run (no CLS token) is reported as n/a. Every measured cell is appended to
``<out>/cells.jsonl`` as it is made, and a rerun skips the cells already there; the table
(``report.md``) and the plot (``report.png``) are rebuilt from that file.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass

from ...engine.errors import PlanError
from ...engine.plan import Plan, default_place
from ...pruners import REGISTRY
from .oracle import oracle_priority, per_video_token
from . import world
from .tiny_models import GRID, IMAGE, VIDEO_FRAMES

BUDGETS = (0.5, 0.25, 0.11, 0.05)
LLM_LAYER = 2  # LLM-stage pruners prune before this decoder layer, scoring with the layer before
ORACLE = "oracle"  # the upper bound: ``priority`` ranked by the world's ground truth (eval/shapeworld/oracle.py)


@dataclass
class Question:
    images: list  # PIL images: one, or the video's frames
    question: str
    answer: str
    type: str
    kind: str  # "image" | "video"
    priority: object = None  # [N_visual] the oracle's ranks of the question's visual tokens (eval/shapeworld/oracle.py)


def held_out(n_images: int, n_videos: int, seed: int = 10_000, mc_fraction: float = 0.2) -> list[Question]:
    """One question per scene / video, of a rotating type so every type is represented."""
    rng, out = random.Random(seed), []
    for kind, n in (("image", n_images), ("video", n_videos)):
        for i in range(n):
            if kind == "image":
                scene = world.random_scene(rng, size=IMAGE)
                frames, qas = [scene], world.image_questions(scene, rng)
            else:
                video = world.random_video(rng, n_frames=VIDEO_FRAMES, size=IMAGE)
                frames, qas = video.frames, world.video_questions(video, rng)
            qa = qas[i % len(qas)]
            qa = world.multiple_choice(qa, rng) if rng.random() < mc_fraction else qa
            out.append(Question([world.render(s) for s in frames], qa.question, qa.answer, qa.type, kind,
                                oracle_priority(frames, qa.refs, GRID)))
    return out


def plan_for(pruner: str, budget: float | None, llm_layer: int = LLM_LAYER) -> str:
    if budget is None:
        return ""
    if pruner == ORACLE:
        return f"priority:keep={budget}"
    if pruner == QUOTA_PAPER:
        return f"quota:keep={budget},yes=A,no=B"
    return default_place(pruner, budget, llm_layer)


# quota on the world: the tiny VLMs can neither decouple a query nor answer QuoTA's "A. yes, B. no" prompt,
# so the objects the question names stand in for the decoupling and the world's own question asks about them
QUOTA_WORLD = {"object_prompt": "is there a {objects} ?", "prompt": "{question}", "yes": "yes", "no": "no"}
# quota as the paper prompts it (QuoTA's own "A. yes, B. no" rating prompt, the probability of "A"; no decoupling):
# what ``quota:keep=X`` runs; its plan names the answer words, so the world's settings are not put in
QUOTA_PAPER = "quota-paper"


def named_objects(question: str) -> list[str]:
    """The objects a world question names: "red circle", or a bare shape ("circle")."""
    words = question.split()
    out = []
    for i, w in enumerate(words):
        if w in world.SHAPES:
            out.append(f"{words[i - 1]} {w}" if i and words[i - 1] in world.COLOURS else w)
    return out


def request_plan(plan: str, question: str):
    """The plan one question runs: ``plan``, with the world's rater settings for a quota stage that does not
    name its answer words (``QUOTA_PAPER``'s does)."""
    if "quota" not in plan:
        return plan
    stages = []
    for stage in Plan.parse(plan).stage_dicts():  # every key the plan gave (positions=, budget rules, ...)
        if stage["pruner"] == "quota" and "yes" not in stage:
            stage = {**QUOTA_WORLD, **stage, **({"objects": named_objects(question)} if named_objects(question) else {})}
        stages.append(stage)
    return stages


def measure(engine, questions: list[Question], plan: str, batch_size: int) -> dict:
    """Accuracy per kind and per question type, and the mean visual tokens the LLM kept."""
    oracle = any(REGISTRY[s.pruner].reads_priority for s in Plan.parse(plan).stages)
    reqs = [{"prompt": q.question, ("video" if q.kind == "video" else "images"): q.images,
             "plan": request_plan(plan, q.question), "max_new_tokens": 1,
             **({"priority": request_priority(engine, q)} if oracle else {})} for q in questions]
    results = engine.generate_batch(reqs, batch_size=batch_size)
    right, total, kept = {}, {}, {}
    for q, r in zip(questions, results):
        ok = int(r.text.strip().split(" ")[0] == q.answer)
        for key in (q.kind, f"{q.kind}/{q.type}"):
            right[key], total[key] = right.get(key, 0) + ok, total.get(key, 0) + 1
        kept.setdefault(q.kind, []).append(r.stats["kept_tokens"] / r.stats["visual_tokens"])
    acc = {k: round(right[k] / total[k], 4) for k in sorted(total)}
    return {"accuracy": acc, "kept_fraction": {k: round(sum(v) / len(v), 4) for k, v in kept.items()}, "n": total}


def request_priority(engine, q: Question):
    """The oracle's ranks in the layout the engine feeds the model: one per frame cell, or for a video
    entering natively (the engine's default on families with a video input) one per video token."""
    if q.kind == "video" and engine.video_mode == "native" and engine.adapter.video_token is not None:
        coords = engine.adapter.video_coords(engine.prepare(q.question, video=q.images))[0]  # [N_v, 3]
        return per_video_token(q.priority, coords, GRID)
    return q.priority


def run(models: dict[str, str], pruners: list[str], budgets: list[float], n_images: int, n_videos: int,
        out: str, batch_size: int = 16, llm_layer: int = LLM_LAYER) -> list[dict]:
    """Measure every (model, pruner, budget) cell not yet in ``<out>/cells.jsonl``; return all cells
    whose plan is the one asked for now (a cell measured with another ``llm_layer`` is measured again)."""
    import tokensieve
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "cells.jsonl")
    cells = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    cells = [c for c in cells if (c["pruner"] in (*REGISTRY, ORACLE, QUOTA_PAPER) or c["budget"] is None)
             and c["plan"] == plan_for(c["pruner"], c["budget"], llm_layer)]
    done = {(c["model"], c["pruner"], c["budget"]) for c in cells}
    questions = held_out(n_images, n_videos)
    todo = [(m, p, b) for m in models for p, b in [("none", None)] + [(p, b) for p in pruners for b in budgets]
            if (m, p, b) not in done]
    engine, loaded = None, None
    with open(path, "a") as f:
        for model, pruner, budget in tqdm(todo, desc="report cells"):
            if model != loaded:  # one model in memory at a time
                if engine is not None:
                    engine.close()
                engine, loaded = tokensieve.load(models[model]), model  # default video mode (Qwen2-VL: native)
            cell = {"model": model, "pruner": pruner, "budget": budget,
                    "plan": plan_for(pruner, budget, llm_layer)}
            try:
                cell.update(measure(engine, questions, cell["plan"], batch_size))
            except PlanError as e:
                cell["error"] = str(e).split(";")[0]
            f.write(json.dumps(cell) + "\n")
            f.flush()
            cells.append(cell)
    if engine is not None:
        engine.close()
    return cells


def table(cells: list[dict], kind: str) -> str:
    """Markdown: one row per pruner, one column per (model, budget); accuracy in %."""
    models = list(dict.fromkeys(c["model"] for c in cells))
    budgets = sorted({c["budget"] for c in cells if c["budget"] is not None}, reverse=True)
    by = {(c["model"], c["pruner"], c["budget"]): c for c in cells}
    head = "| pruner | " + " | ".join(f"{m} {b:.0%}" for m in models for b in budgets) + " |"
    lines = [head, "|" + "---|" * (1 + len(models) * len(budgets))]
    full = " | ".join(_pct(by.get((m, "none", None)), kind) for m in models for _ in budgets)
    lines.append(f"| (all tokens) | {full} |")
    for p in _pruners(cells):
        lines.append(f"| {p} | " + " | ".join(_pct(by.get((m, p, b)), kind) for m in models for b in budgets) + " |")
    return "\n".join(lines)


def _pruners(cells: list[dict]) -> list[str]:
    """The measured pruners, the oracle first."""
    names = list(dict.fromkeys(c["pruner"] for c in cells if c["pruner"] != "none"))
    return sorted(names, key=lambda p: p != ORACLE)


def share(cells: list[dict], kind: str) -> str:
    """Markdown: each pruner's accuracy as a share of the oracle's at the same model and budget, in %."""
    models = list(dict.fromkeys(c["model"] for c in cells))
    budgets = sorted({c["budget"] for c in cells if c["budget"] is not None}, reverse=True)
    by = {(c["model"], c["pruner"], c["budget"]): c for c in cells}

    def cell(m, p, b):
        c, o = by.get((m, p, b)), by.get((m, ORACLE, b))
        if c is None or o is None or "error" in c or kind not in c.get("accuracy", {}) or not o["accuracy"].get(kind):
            return "n/a" if c is not None and "error" in c else ""
        return f"{100 * c['accuracy'][kind] / o['accuracy'][kind]:.0f}"

    head = "| pruner | " + " | ".join(f"{m} {b:.0%}" for m in models for b in budgets) + " |"
    lines = [head, "|" + "---|" * (1 + len(models) * len(budgets))]
    for p in _pruners(cells):
        if p != ORACLE:
            lines.append(f"| {p} | " + " | ".join(cell(m, p, b) for m in models for b in budgets) + " |")
    return "\n".join(lines)


def per_type(cells: list[dict]) -> str:
    """Markdown: the full-token accuracy of each model per question type (the quality bar of issue 5)."""
    full = [c for c in cells if c["pruner"] == "none" and "accuracy" in c]
    keys = sorted({k for c in full for k in c["accuracy"] if "/" in k}, key=lambda k: (k.split("/")[0] != "image", k))
    lines = ["| model | " + " | ".join(keys) + " | image | video |", "|" + "---|" * (3 + len(keys))]
    for c in full:
        cols = [f"{100 * c['accuracy'][k]:.0f} (n={c['n'][k]})" if k in c["accuracy"] else "" for k in keys]
        cols += [f"{100 * c['accuracy'][k]:.1f}" if k in c["accuracy"] else "" for k in ("image", "video")]
        lines.append(f"| {c['model']} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _pct(cell: dict | None, kind: str) -> str:
    if cell is None:
        return ""
    if "error" in cell:
        return "n/a"
    return f"{100 * cell['accuracy'][kind]:.0f}" if kind in cell["accuracy"] else ""


def plot(cells: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c["model"] for c in cells))
    kinds = [k for k in ("image", "video") if any(k in c.get("accuracy", {}) for c in cells)]
    fig, axes = plt.subplots(len(kinds), len(models), figsize=(6 * len(models), 4 * len(kinds)), squeeze=False)
    for (i, kind), (j, model) in ((a, b) for a in enumerate(kinds) for b in enumerate(models)):
        ax = axes[i][j]
        mine = [c for c in cells if c["model"] == model and kind in c.get("accuracy", {})]
        full = next((c["accuracy"][kind] for c in mine if c["pruner"] == "none"), None)
        for n, p in enumerate(_pruners(mine)):
            pts = sorted((c["budget"], c["accuracy"][kind]) for c in mine if c["pruner"] == p)
            style = dict(color="black", linestyle=":", linewidth=2) if p == ORACLE else \
                dict(color=plt.cm.tab20(n % 20), linestyle="-" if n < 10 else "--")
            ax.plot([100 * b for b, _ in pts], [100 * a for _, a in pts], marker="o", label=p, **style)
        if full is not None:
            ax.axhline(100 * full, color="black", linestyle="--", label="all tokens")
        ax.set(xscale="log", xlabel="visual tokens kept (%)", ylabel="accuracy (%)", title=f"{model}: {kind} questions")
        ax.minorticks_off()
        ax.set_xticks([5, 11, 25, 50], ["5", "11", "25", "50"])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(cells: list[dict], out: str) -> str:
    md = ["# Accuracy versus visual-token budget (held-out, full-token row first)", "",
          "## Full-token accuracy per question type (%)", "", per_type(cells), ""]
    for kind in ("image", "video"):
        if any(kind in c.get("accuracy", {}) for c in cells):
            md += [f"## {kind} questions (accuracy %)", "", table(cells, kind), ""]
            if any(c["pruner"] == ORACLE for c in cells):
                md += [f"## {kind} questions: accuracy as a share of the oracle's (%)", "", share(cells, kind), ""]
    text = "\n".join(md)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    plot(cells, os.path.join(out, "report.png"))
    return text


def main(argv=None):
    from . import shipped

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(shipped.MODELS),
                    help=f"shipped model names ({', '.join([*shipped.MODELS, *shipped.MODELS.values()])}) or checkpoint directories")
    ap.add_argument("--pruners", nargs="*", default=[ORACLE] + [p for p, c in REGISTRY.items() if not c.reads_priority],
                    help=f"registered pruners, '{ORACLE}' (the ground-truth upper bound; default: all) and "
                         f"'{QUOTA_PAPER}' (quota with QuoTA's own rating prompt; 'quota' rates with the world's "
                         "question); none given: only the full-token baseline")
    ap.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    ap.add_argument("--n-images", type=int, default=120)
    ap.add_argument("--n-videos", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="eval/results/pruning")
    ap.add_argument("--llm-layer", type=int, default=LLM_LAYER,
                    help=f"decoder layer the LLM-stage pruners prune before (default {LLM_LAYER} of the tiny models' 4)")
    args = ap.parse_args(argv)
    unknown = [p for p in args.pruners if p not in (*REGISTRY, ORACLE, QUOTA_PAPER)]
    if unknown:
        raise SystemExit(f"unknown pruner(s) {unknown}; known: {ORACLE}, {QUOTA_PAPER}, {', '.join(REGISTRY)}")
    bad = [b for b in args.budgets if not 0 < b <= 1]
    if bad:
        raise SystemExit(f"budgets must be fractions in (0, 1], got {bad}")
    models = {m: shipped.resolve(m) for m in args.models}
    for name, p in models.items():
        if not os.path.isfile(os.path.join(p, "config.json")):
            raise SystemExit(f"model '{name}': no checkpoint at {p}")
    cells = run(models, args.pruners, args.budgets, args.n_images, args.n_videos, args.out, args.batch_size,
                args.llm_layer)
    print(write(cells, args.out))


if __name__ == "__main__":
    main()

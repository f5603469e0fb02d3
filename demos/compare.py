"""The demo's comparison, without the UI: one question about one image or video, answered under up to four
budgets, one column each, streamed. ``compare`` yields the columns as they fill; the app draws them.

    for columns in compare(engine, "scene.png", "what colour is the circle ?", "divprune", "1,0.5,0.25,0.11"):
        columns[-1].answer, columns[-1].result
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from statistics import median

from PIL import Image

from ..engine.errors import InputError, PlanError, TokenSieveError
from ..engine.plan import Plan, default_place

MAX_COLUMNS = 4
LLM_LAYER = 2  # an LLM-stage pruner chosen by name prunes before this layer (FastV's K, on any model)
DEFAULT_PRUNER = "divprune"
TIMING_RUNS = 3  # each column's times: the median of this many runs after the answering one (its warm-up)
DEFAULT_BUDGETS = "1,0.5,0.25,0.11"
AUTO = "auto"  # a budget column where each request chooses its own budget (keep=auto)
AUTO_MASS, AUTO_TAU = "mass=0.9", "tau=0.2"  # the auto column's rule: with scores / without
MAX_VIDEO_SECONDS = 600.0  # longer uploads are refused (the demo samples 8 frames; the cap bounds probing)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
JSON_FIELDS = ("plan", "answer", "visual_tokens", "kept_tokens", "prefill_s", "decode_s", "prefill_flops",
               "kv_cache_bytes", "timing_runs", "unknown_words")
TIMES = ("prefill_s", "decode_s")  # reported as the median of the timing runs


class DemoError(TokenSieveError):
    """A request the demo cannot run (shown as a message in the page)."""


@dataclass
class Column:
    label: str  # "all tokens" or "50 %"
    plan: str  # the plan string ("" for all tokens)
    answer: str = ""
    result: object = None  # the Result once the answer is complete
    pictures: list = field(default_factory=list)  # (overlay image, caption)
    times: dict = field(default_factory=dict)  # prefill_s, decode_s: medians of timing_runs runs, once timed

    def summary(self) -> dict:
        """The column as the /compare endpoint's JSON reports it (times: None until timed)."""
        st = self.result.stats if self.result is not None else {}
        return {"plan": self.plan, "answer": self.answer, **{k: st.get(k) for k in JSON_FIELDS[2:-2]},
                **{k: self.times.get(k) for k in (*TIMES, "timing_runs")},
                "unknown_words": self.result.unknown_words if self.result is not None else []}


def parse_budgets(text: str) -> list[float | str]:
    """"1,0.5,0.25,auto" -> ratios of the visual tokens kept (1 = all) or AUTO (each request's own budget,
    ``auto_rule``); at most four, each ratio in (0, 1]."""
    try:
        values = [AUTO if v.lower() == AUTO else float(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise DemoError(f"budgets must be ratios in (0, 1] or auto, separated by commas, e.g. {DEFAULT_BUDGETS}; "
                        f"got {text!r}") from None
    if not values or len(values) > MAX_COLUMNS or any(v != AUTO and not 0 < v <= 1 for v in values):
        raise DemoError(f"give 1 to {MAX_COLUMNS} budgets in (0, 1] or auto, separated by commas (1 = all tokens); "
                        f"got {text!r}")
    return values


def auto_rule(choice: str) -> str:
    """The auto column's rule: the importance-mass rule (``mass=0.9``) for a pruner with scores, else the
    redundancy rule (``tau=0.2``); the budget rules are in engine/budget.py."""
    from ..pruners import REGISTRY

    names = [choice] if choice in REGISTRY else [s.pruner for s in Plan.parse(choice.replace("{keep}", "1.0")).stages]
    return AUTO_MASS if all(REGISTRY[n].scored for n in names) else AUTO_TAU


def plans_for(choice: str, budgets: list[float]) -> list[Column]:
    """A pruner's name (placed where it acts by default; LLM pruners before layer 2) or a plan template with
    ``{keep}``, at every budget -> the columns. Raises DemoError / PlanError before any model work."""
    from ..pruners import REGISTRY

    choice = (choice or "").strip()
    if "{keep}" not in choice and choice not in REGISTRY:
        raise DemoError(f"choose a pruner ({', '.join(sorted(REGISTRY))}) or a plan template with {{keep}}, "
                        f"e.g. fastv:layer=2,keep={{keep}}; got {choice!r}")
    columns = []
    for b in budgets:
        if b == AUTO:
            rule = auto_rule(choice)
            keep = f"auto,{rule}"
            plan = choice.replace("{keep}", keep) if "{keep}" in choice else default_place(choice, keep, LLM_LAYER)
            columns.append(Column(f"auto ({rule.replace('=', ' ')})", str(Plan.parse(plan))))
            continue
        if b >= 1:
            columns.append(Column("all tokens", ""))
            continue
        plan = choice.replace("{keep}", f"{b:g}") if "{keep}" in choice else default_place(choice, b, LLM_LAYER)
        columns.append(Column(f"{b:.0%} of the tokens", str(Plan.parse(plan))))
    return columns


def load_media(path) -> tuple[str, object]:
    """("image", PIL image) or ("video", DecodedVideo: 8 frames) of an uploaded file. Raises DemoError."""
    from ..engine.images import load_image
    from ..engine.video import decode_video, probe_video

    if not path:
        raise DemoError("upload an image or a video, or pick one of the examples")
    path = str(path)
    if not os.path.isfile(path):
        raise DemoError(f"the uploaded file is gone: {path}")
    if path.lower().endswith(VIDEO_SUFFIXES):
        try:
            probe = probe_video(path, default_nframes=8)
            seconds = probe.total_frames / probe.video_fps if probe.video_fps else 0.0
            if seconds > MAX_VIDEO_SECONDS:
                raise DemoError(f"the video is {seconds:.0f} s long; this demo takes videos up to "
                                f"{MAX_VIDEO_SECONDS:.0f} s")
            return "video", decode_video(path, default_nframes=8)
        except InputError as e:
            raise DemoError(f"cannot use this video: {e}") from None
    try:
        return "image", load_image(path, os.path.basename(path))
    except InputError as e:
        raise DemoError(f"not an image or a video tokensieve can read: {e}") from None


def compare(engine, media, question: str, choice: str, budgets: str, max_new_tokens: int = 16,
            timing_runs: int = TIMING_RUNS):
    """Yield the list of columns after every decoded piece, and once more when every column is timed
    (``time_columns``); every input is checked before the first model call (DemoError / PlanError / InputError)."""
    from .overlay import frame_overlays, image_overlays

    if not isinstance(question, str) or not question.strip():
        raise DemoError("type a question")
    if not isinstance(timing_runs, int) or timing_runs < 1:
        raise DemoError(f"timing_runs must be an int >= 1, got {timing_runs!r}")
    columns = plans_for(choice, parse_budgets(budgets))
    kind, value = load_media(media)
    inputs = {"images": [value]} if kind == "image" else {"video": value}
    streams = []
    for col in columns:  # every plan checked against the model and this input before any model work
        try:
            streams.append(engine.stream(question, plan=col.plan or None, max_new_tokens=max_new_tokens, **inputs))
        except PlanError as e:
            raise DemoError(f"{col.label}: {e}") from None
    yield columns
    for col, stream in zip(columns, streams):
        for piece in stream:
            if isinstance(piece, str):
                col.answer += piece
            else:
                col.result, col.answer = piece, piece.text
                col.pictures = (image_overlays(piece, [value]) if kind == "image" else
                                frame_overlays(piece, value.frames, piece.stats["kept_tokens"]))
            yield columns
    time_columns(engine, columns, question, inputs, timing_runs, max_new_tokens)
    yield columns


def time_columns(engine, columns: list[Column], question: str, inputs: dict, runs: int, max_new_tokens: int) -> None:
    """Set each column's ``times``: its prefill and decode seconds as the median of ``runs`` more runs of its
    plan, taken in turn (column 1, 2, .., 1, 2, ..) so that a busy moment of a shared CPU falls on every
    column alike. The streamed run that answered is each plan's warm-up and is not counted: a plan's first
    run pays one-off costs (a pruner's first call, allocations) that read as "pruning is slower"."""
    seen = [[] for _ in columns]
    for _ in range(runs):
        for col, times in zip(columns, seen):
            times.append(engine.generate(question, plan=col.plan or None, max_new_tokens=max_new_tokens,
                                         **inputs).stats)
    for col, times in zip(columns, seen):
        col.times = {**{k: median(st[k] for st in times) for k in TIMES}, "timing_runs": runs}


def warm_up(engine) -> None:
    """Two short runs on the first bundled example, all tokens and the default pruner at 50 %: the engine's
    first-call costs are paid at start, not by the first comparison."""
    path, question = example_files()[0]
    for plan in (None, default_place(DEFAULT_PRUNER, 0.5, LLM_LAYER)):
        engine.generate(question, images=[path], plan=plan, max_new_tokens=2)


def chart(columns: list[Column]):
    """A matplotlib figure: kept tokens and prefill / decode time against the budget, one point per column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in columns if c.result is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 2.8))
    labels = [c.label.replace(" of the tokens", "") for c in done]
    ax1.bar(labels, [c.result.stats["kept_tokens"] for c in done], color="#3c8dbc")
    ax1.set(title="visual tokens kept", ylabel="tokens")
    timed = [c for c in done if c.times]
    runs = timed[0].times["timing_runs"] if timed else 0
    at = [labels[done.index(c)] for c in timed]
    for key, marks in (("prefill_s", "o-"), ("decode_s", "s-")):
        ax2.plot(at, [1000 * c.times[key] for c in timed], marks, label=key[:-2])
    ax2.set(title=f"time (ms): median of {runs} runs", ylabel="ms")
    ax2.annotate("differences of a few ms are noise on a busy CPU", (0, -0.32), xycoords="axes fraction", fontsize=7,
                 color="#666")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def example_files() -> list[tuple[str, str]]:
    """The bundled examples: (path, question), world scenes and a world video where the budgets visibly
    differ on the embedded model (demos/examples/README.md says how they were chosen)."""
    here = os.path.join(os.path.dirname(__file__), "examples")
    return [(os.path.join(here, "shapes_purple_square.png"), "what colour is the square ?"),
            (os.path.join(here, "shapes_red_count.png"), "how many red objects are there ?"),
            (os.path.join(here, "objects_appear.mp4"), "how many distinct objects appeared ?")]


def preview(media) -> Image.Image | None:
    """The first frame of a video, or the image itself, for the page (None when it cannot be read)."""
    try:
        kind, value = load_media(media)
    except DemoError:
        return None
    return value if kind == "image" else value.frames[0]


def world_note(engine) -> str:
    """The limits of a model shipped with tokensieve (trained on the shape world only) for the top of the
    page; "" for any other model."""
    from .. import shipped
    from ..eval.shapeworld import world

    if not os.path.abspath(engine.model.name_or_path).startswith(os.path.abspath(shipped.ROOT)):
        return ""
    return (f"**This model knows one small world only**: shapes ({', '.join(world.SHAPES)}) in colours "
            f"({', '.join(world.COLOURS)}) on grey backgrounds ({', '.join(world.BACKGROUNDS)}), asked about in "
            "its own words (what colour / shape, how many, is there, left or right, which came first…); it answers "
            "in one word. Words it was never trained on are listed as *not understood*; other pictures are beyond it.")

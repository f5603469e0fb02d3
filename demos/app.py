"""``tokensieve demo``: the same question answered under up to four token budgets, side by side (Gradio).

    tokensieve demo [--model M] [--host 127.0.0.1] [--port 7860] [--plan-template "fastv:layer=2,keep={keep}"]
    python -m tokensieve.demos.app

Upload an image or a video (or pick a bundled example), type a question, choose a pruner or a plan template
with ``{keep}`` and up to four budgets; each column streams its answer and shows the visual tokens kept, the
prefill / decode time (the median of ``--timing-runs`` runs after the answering one), prefill FLOPs, KV-cache
bytes and one picture of what was kept (for a video: every frame, with its share of the kept tokens).
The same comparison is an API endpoint: ``gradio_client.Client(url).predict(handle_file(path), question,
pruner_or_template, "1,0.5,0.25,0.11", api_name="/compare")`` -> (..., JSON list: one entry per column).

Serving: one model call at a time (``concurrency_limit=1``: one engine), a bounded queue (``--queue``), an
upload size limit (``--max-file-size``) and a video length limit; a bad upload, question or plan shows one
message above the columns and leaves the earlier results. Offline: no analytics, nothing downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no analytics calls

from .compare import (DEFAULT_BUDGETS, DEFAULT_PRUNER, MAX_COLUMNS, TIMING_RUNS, DemoError, chart,  # noqa: E402
                      compare, example_files, preview, warm_up, world_note)

TEMPLATES = ["fastv:layer=2,keep={keep}", "uniform:keep=0.5;divprune:keep={keep}"]
OUTPUTS_PER_SLOT = 4  # visible group, answer, stats, picture


def save_once(image, workdir: str) -> str:
    """``image`` written to a new file of its own in ``workdir``; its path. A picture is never written again
    under a name the page has been given: Gradio serves the file while later updates stream, and a file
    rewritten while it is sent breaks the download (h11: "Too much data for declared Content-Length")."""
    fd, path = tempfile.mkstemp(suffix=".webp", dir=workdir)
    with os.fdopen(fd, "wb") as f:
        image.save(f, format="WEBP", quality=90)
    return path


def _stats_text(col) -> str:
    """A column's costs as Markdown (times once the column is timed)."""
    st = col.result.stats
    times = (f"prefill {1000 * col.times['prefill_s']:.1f} ms, decode {1000 * col.times['decode_s']:.1f} ms "
             f"({st['new_tokens']} tokens; median of {col.times['timing_runs']} runs)" if col.times else
             "prefill / decode time: timing…")
    return (f"**{st['kept_tokens']} / {st['visual_tokens']}** visual tokens kept  \n{times}  \n"
            f"prefill FLOPs {st['prefill_flops']:.3g}  \nKV cache {st['kv_cache_bytes'] / 1024:.1f} KiB")


def _column_outputs(columns, shown: dict, workdir: str, final: bool) -> list:
    """Per column slot: (visible group, answer, stats, picture). A column's picture (every image or frame on
    one sheet) is written once, when its answer is complete (``shown``: slot -> path), and sent in that update
    and the final one; in between the page keeps it (gr.skip())."""
    import gradio as gr

    from .overlay import sheet

    out = []
    for i in range(MAX_COLUMNS):
        if i >= len(columns):
            out += [gr.update(visible=False), "", "", None]
            continue
        col = columns[i]
        picture = None
        if col.pictures and i not in shown:
            picture = shown[i] = save_once(sheet(col.pictures), workdir)
        elif i in shown:
            picture = shown[i] if final else gr.skip()
        head = f"### {col.label}\n`{col.plan or '(no pruning)'}`\n\n**Answer:** {col.answer or '…'}"
        out += [gr.update(visible=True), head, _stats_text(col) if col.result is not None else "", picture]
    return out


def _status(columns, timing_runs: int) -> str:
    """The line above the columns: what is running (nothing once done), and the question's words the model
    was never trained on (the same in every column)."""
    if not all(c.result is not None for c in columns):
        doing = "answering…"
    else:
        doing = "" if all(c.times for c in columns) else f"timing: {timing_runs} runs of each column…"
    unknown = next((c.result.unknown_words for c in columns if c.result is not None), [])
    note = (f"**note: not understood: {', '.join(unknown)}** (words the model was never trained on; it ignores "
            "them)") if unknown else ""
    return "  \n".join(line for line in (note, doing) if line)


def respond(engine, workdir: str, media, question, choice, budgets, max_new_tokens: int = 16,
            timing_runs: int = TIMING_RUNS):
    """The compare button: yields (slot outputs.., chart, JSON rows, status) as the columns fill. A bad
    upload, question or plan shows one message in the status and leaves the earlier results as they were;
    the call still fails (gr.Error, its toast hidden) so that an API client gets the message."""
    import gradio as gr

    from ..engine.errors import TokenSieveError

    shown: dict = {}
    try:
        for columns in compare(engine, media, question, choice, budgets, max_new_tokens=max_new_tokens,
                               timing_runs=timing_runs):
            final = all(c.times for c in columns)
            yield (*_column_outputs(columns, shown, workdir, final), chart(columns) if final else None,
                   [c.summary() for c in columns], _status(columns, timing_runs))
    except TokenSieveError as e:  # the app keeps serving
        yield (*[gr.skip()] * (OUTPUTS_PER_SLOT * MAX_COLUMNS + 2), f"**Cannot compare:** {e}")
        raise gr.Error(str(e), print_exception=False, visible=False) from None


def build(engine, plan_template: str | None = None, max_new_tokens: int = 16, timing_runs: int = TIMING_RUNS,
          workdir: str | None = None):
    """The Gradio Blocks of the demo around one engine; its pictures are written to ``workdir`` (default: a
    new temporary directory)."""
    import gradio as gr

    from ..pruners import REGISTRY

    workdir = workdir or tempfile.mkdtemp(prefix="tokensieve-demo-")
    warm_up(engine)  # first-call costs off the clock
    choices = sorted(REGISTRY) + TEMPLATES + ([plan_template] if plan_template and plan_template not in TEMPLATES else [])

    def run(media, question, choice, budgets):
        yield from respond(engine, workdir, media, question, choice, budgets, max_new_tokens, timing_runs)

    def show(media):
        image = preview(media)
        return None if image is None else save_once(image, workdir)

    with gr.Blocks(title="tokensieve: compare token budgets") as demo:
        gr.Markdown("# tokensieve: the same question under several visual-token budgets\n"
                    "Upload an image or a video (or pick an example), ask, and compare the answers, costs and "
                    "what each budget kept (green outlines: kept tokens; red: importance; dark: dropped)."
                    + (f"\n\n{note}" if (note := world_note(engine)) else ""))
        with gr.Row():
            with gr.Column(scale=1):
                media = gr.File(label="image or video", file_types=["image", "video"], type="filepath")
                shown = gr.Image(label="preview", interactive=False, height=200)
            with gr.Column(scale=2):
                question = gr.Textbox(label="question", placeholder="what colour is the circle ?")
                choice = gr.Dropdown(choices, value=plan_template or DEFAULT_PRUNER, allow_custom_value=True,
                                     label="pruner, or a plan template with {keep}")
                budgets = gr.Textbox(DEFAULT_BUDGETS, label=f"budgets: up to {MAX_COLUMNS} ratios (1 = all tokens) or auto "
                                     "(the request chooses: keep=auto)")
                go = gr.Button("compare", variant="primary")
        gr.Examples([[path, q] for path, q in example_files()], inputs=[media, question], label="examples")
        status = gr.Markdown("", elem_id="status")
        slots = []
        with gr.Row(equal_height=False):
            for i in range(MAX_COLUMNS):
                with gr.Column(visible=False, min_width=200, elem_id=f"column-{i}") as group:
                    answer = gr.Markdown(elem_id=f"answer-{i}")
                    stats = gr.Markdown(elem_id=f"stats-{i}")
                    picture = gr.Image(label="kept tokens", show_label=False, interactive=False,
                                       elem_id=f"overlay-{i}")
                slots += [group, answer, stats, picture]
        plot = gr.Plot(label="tokens and time against the budget", elem_id="plot")
        table = gr.JSON(label="per column")
        media.change(show, inputs=media, outputs=shown, api_visibility="private")
        go.click(run, inputs=[media, question, choice, budgets], outputs=[*slots, plot, table, status],
                 api_name="compare", concurrency_limit=1, concurrency_id="engine",
                 show_progress_on=[go])  # progress and a failure are the status line's words, not a badge per output
    return demo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tokensieve demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="hub id, local directory or shipped model (tiny-llava, tiny-qwen2-vl; "
                    "default: the embedded tiny-llava)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--plan-template", help="a plan with {keep} offered first, e.g. 'fastv:layer=2,keep={keep}'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--timing-runs", type=int, default=TIMING_RUNS,
                    help="each column's times: the median of this many runs after the answering one")
    ap.add_argument("--queue", type=int, default=32, help="requests waiting at most (more are turned away)")
    ap.add_argument("--max-file-size", default="50mb", help="largest upload")
    args = ap.parse_args(argv)
    import tokensieve

    try:
        if args.plan_template and "{keep}" not in args.plan_template:
            raise DemoError(f"--plan-template needs {{keep}}, got {args.plan_template!r}")
        if args.timing_runs < 1:
            raise DemoError(f"--timing-runs must be >= 1, got {args.timing_runs}")
        engine = tokensieve.load(args.model, device=args.device, dtype=args.dtype)
    except tokensieve.TokenSieveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tokensieve-demo-") as workdir:  # its pictures, removed on exit
        demo = build(engine, args.plan_template, args.max_new_tokens, args.timing_runs, workdir)
        demo.queue(max_size=args.queue, default_concurrency_limit=1)
        demo.launch(server_name=args.host, server_port=args.port, max_file_size=args.max_file_size, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

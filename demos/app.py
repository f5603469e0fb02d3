"""``tokensieve demo``: the same question answered under up to four token budgets, side by side (Gradio).

    tokensieve demo [--model M] [--host 127.0.0.1] [--port 7860] [--plan-template "fastv:layer=2,keep={keep}"]
    python -m tokensieve.demos.app

Upload an image or a video (or pick a bundled example), type a question, choose a pruner or a plan template
with ``{keep}`` and up to four budgets; each column streams its answer and shows the visual tokens kept, the
prefill / decode time, prefill FLOPs, KV-cache bytes and the picture of what was kept (per frame for a video).
The same comparison is an API endpoint: ``gradio_client.Client(url).predict(handle_file(path), question,
pruner_or_template, "1,0.5,0.25,0.11", api_name="/compare")`` -> (..., JSON list: one entry per column).

Serving: one model call at a time (``concurrency_limit=1``: one engine), a bounded queue (``--queue``), an
upload size limit (``--max-file-size``) and a video length limit; a bad upload, question or plan shows a
message in the page. Offline: no analytics, nothing downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no analytics calls

from .compare import DEFAULT_BUDGETS, MAX_COLUMNS, DemoError, chart, compare, example_files, preview  # noqa: E402

DEFAULT_PRUNER = "divprune"
TEMPLATES = ["fastv:layer=2,keep={keep}", "uniform:keep=0.5;divprune:keep={keep}"]


def _column_outputs(columns) -> list:
    """Per column slot: (visible group, answer, stats, gallery)."""
    import gradio as gr

    out = []
    for i in range(MAX_COLUMNS):
        if i >= len(columns):
            out += [gr.update(visible=False), "", "", None]
            continue
        col = columns[i]
        st = col.result.stats if col.result is not None else None
        stats = "" if st is None else (
            f"**{st['kept_tokens']} / {st['visual_tokens']}** visual tokens kept  \n"
            f"prefill {1000 * st['prefill_s']:.1f} ms, decode {1000 * st['decode_s']:.1f} ms "
            f"({st['new_tokens']} tokens)  \nprefill FLOPs {st['prefill_flops']:.3g}  \n"
            f"KV cache {st['kv_cache_bytes'] / 1024:.1f} KiB")
        head = f"### {col.label}\n`{col.plan or '(no pruning)'}`\n\n**Answer:** {col.answer or '…'}"
        out += [gr.update(visible=True), head, stats, col.pictures or None]
    return out


def build(engine, plan_template: str | None = None, max_new_tokens: int = 16):
    """The Gradio Blocks of the demo around one engine."""
    import gradio as gr

    from ..engine.errors import TokenSieveError
    from ..pruners import REGISTRY

    from PIL import Image

    engine.generate("warm up", images=[Image.new("RGB", (32, 32))], max_new_tokens=1)  # first-call costs off the clock
    choices = sorted(REGISTRY) + TEMPLATES + ([plan_template] if plan_template and plan_template not in TEMPLATES else [])

    def run(media, question, choice, budgets):
        try:
            for columns in compare(engine, media, question, choice, budgets, max_new_tokens=max_new_tokens):
                done = all(c.result is not None for c in columns)
                yield (*_column_outputs(columns), chart(columns) if done else None,
                       [c.summary() for c in columns], "" if done else "answering…")
        except TokenSieveError as e:  # a bad upload, question or plan: the page shows it, the app keeps serving
            raise gr.Error(str(e), print_exception=False) from None

    with gr.Blocks(title="tokensieve: compare token budgets") as demo:
        gr.Markdown("# tokensieve: the same question under several visual-token budgets\n"
                    "Upload an image or a video (or pick an example), ask, and compare the answers, costs and "
                    "what each budget kept (green outlines: kept tokens; red: importance; dark: dropped).")
        with gr.Row():
            with gr.Column(scale=1):
                media = gr.File(label="image or video", file_types=["image", "video"], type="filepath")
                shown = gr.Image(label="preview", interactive=False, height=200)
            with gr.Column(scale=2):
                question = gr.Textbox(label="question", placeholder="what colour is the circle ?")
                choice = gr.Dropdown(choices, value=plan_template or DEFAULT_PRUNER, allow_custom_value=True,
                                     label="pruner, or a plan template with {keep}")
                budgets = gr.Textbox(DEFAULT_BUDGETS, label=f"budgets: up to {MAX_COLUMNS} ratios (1 = all tokens)")
                go = gr.Button("compare", variant="primary")
                status = gr.Markdown("")
        gr.Examples([[path, q] for path, q in example_files()], inputs=[media, question], label="examples")
        slots = []
        with gr.Row(equal_height=False):
            for i in range(MAX_COLUMNS):
                with gr.Column(visible=False, min_width=200, elem_id=f"column-{i}") as group:
                    answer = gr.Markdown(elem_id=f"answer-{i}")
                    stats = gr.Markdown(elem_id=f"stats-{i}")
                    gallery = gr.Gallery(label="kept tokens", columns=2, height=300, object_fit="contain",
                                         elem_id=f"overlay-{i}")
                slots += [group, answer, stats, gallery]
        plot = gr.Plot(label="tokens and time against the budget")
        table = gr.JSON(label="per column")
        media.change(preview, inputs=media, outputs=shown, api_visibility="private")
        go.click(run, inputs=[media, question, choice, budgets], outputs=[*slots, plot, table, status],
                 api_name="compare", concurrency_limit=1, concurrency_id="engine")
    return demo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tokensieve demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="hub id or local directory (default: the embedded model)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--plan-template", help="a plan with {keep} offered first, e.g. 'fastv:layer=2,keep={keep}'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--queue", type=int, default=32, help="requests waiting at most (more are turned away)")
    ap.add_argument("--max-file-size", default="50mb", help="largest upload")
    args = ap.parse_args(argv)
    import tokensieve

    try:
        if args.plan_template and "{keep}" not in args.plan_template:
            raise DemoError(f"--plan-template needs {{keep}}, got {args.plan_template!r}")
        engine = tokensieve.load(args.model, device=args.device, dtype=args.dtype)
    except tokensieve.TokenSieveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = build(engine, args.plan_template, args.max_new_tokens)
    demo.queue(max_size=args.queue, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=args.max_file_size, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Engine benchmark: prefill time and FLOPs of each plan against the unpruned baseline, same process.

    python -m tokensieve.eval.bench_engine                  # a random LLaVA-1.5-shaped model, 576 visual tokens
    python -m tokensieve.eval.bench_engine --model PATH     # any supported checkpoint

For every plan: median time to first token (vision tower + prefill) and of decoding, their ratio
to the baseline measured in the same process, and the analytic ideal ratio from the FLOP model
(vision + prefill FLOPs, engine/metering.py). Writes a Markdown table, JSON and a plot.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics

import torch
from tqdm import tqdm

DEFAULT_PLANS = ["", "fastv:layer=2,keep=0.25", "cls:keep=0.25", "visionzip:keep=0.11", "tome:keep=0.25",
                 "divprune:keep=0.11", "uniform:where=vision,layer=12,keep=0.5;fastv:layer=2,keep=0.25"]


def make_bench_llava(path: str, seed: int = 0) -> str:
    """A random model with LLaVA-1.5's token geometry (336 px, patch 14: 576 visual tokens), small widths."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ..testing import CHAT_TEMPLATES, make_tokenizer

    torch.manual_seed(seed)
    tok = make_tokenizer()
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=4,
                              image_size=336, patch_size=14)
    text = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=len(tok), max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    ip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATES["llava"], num_additional_image_tokens=1)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path


def run(engine, image, plans, repeats: int, new_tokens: int) -> list[dict]:
    rows = []
    for plan in tqdm(plans, desc="plans"):
        res = [engine.generate("what is the colour of the circle", images=[image], plan=plan or None,
                               max_new_tokens=new_tokens) for _ in range(repeats + 1)][1:]  # first run warms up
        s = res[0].stats
        rows.append({"plan": plan or "(none)", "kept_tokens": s["kept_tokens"], "visual_tokens": s["visual_tokens"],
                     "ttft_s": statistics.median(r.stats["prefill_s"] for r in res),
                     "decode_s": statistics.median(r.stats["decode_s"] for r in res),
                     "flops": s["prefill_flops"] + s["vision_flops"], "kv_cache_bytes": s["kv_cache_bytes"]})
    base = rows[0]
    for r in rows:
        r["ttft_ratio"] = r["ttft_s"] / base["ttft_s"]
        r["ideal_ratio"] = r["flops"] / base["flops"]
        r["decode_ratio"] = r["decode_s"] / base["decode_s"]
    return rows


def to_markdown(rows, env) -> str:
    lines = [f"# Engine benchmark — {env['device']}", "", ", ".join(f"{k}: {v}" for k, v in env.items()), "",
             "| plan | kept / visual | TTFT ms | x baseline | ideal x (FLOPs) | decode ms | KV cache KiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['plan']}` | {r['kept_tokens']} / {r['visual_tokens']} | {r['ttft_s'] * 1e3:.1f} | "
                     f"{r['ttft_ratio']:.2f} | {r['ideal_ratio']:.2f} | {r['decode_s'] * 1e3:.1f} | "
                     f"{r['kv_cache_bytes'] / 1024:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["plan"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["ttft_ratio"] for r in rows], 0.4, label="measured TTFT ratio")
    ax.bar([i + 0.2 for i in x], [r["ideal_ratio"] for r in rows], 0.4, label="ideal (FLOPs) ratio")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("x unpruned")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    import tokensieve
    from .shapeworld.world import Obj, Scene, render

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: a random LLaVA-1.5-shaped model)")
    ap.add_argument("--plan", action="append", default=[], help="plans to compare (the first should be '')")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default="eval/results")
    args = ap.parse_args(argv)
    home = os.path.expanduser(os.environ.get("TOKENSIEVE_HOME", "~/.cache/tokensieve"))
    model = args.model or make_bench_llava(os.path.join(home, "bench-llava"))
    engine = tokensieve.load(model, device=args.device, dtype=args.dtype)
    image = render(Scene([Obj("circle", "red", "big", 0.3, 0.3), Obj("square", "blue", "small", 0.7, 0.6)], size=336))
    rows = run(engine, image, args.plan or DEFAULT_PLANS, args.repeats, args.new_tokens)
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores "
           f"({platform.machine()})", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "model": args.model or "random LLaVA-1.5-shaped (24-layer CLIP w256, 8-layer Llama w512)",
           "date": datetime.date.today().isoformat()}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"engine_bench_{args.device}_{env['date']}")
    with open(stem + ".json", "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    md = to_markdown(rows, env)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(rows, stem + ".png")
    print(md)
    return stem


if __name__ == "__main__":
    main()

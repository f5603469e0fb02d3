"""Benchmark: attention with importance vs SDPA-flash and eager attention.

    python -m tokensieve.kernels.bench                 # on a GPU: 1k / 4k / 16k, 32 heads, d=128, bf16, causal
    python -m tokensieve.kernels.bench --smoke         # tiny shapes on CPU (reference path): checks the script

Variants, timed in the same process (median of --iters after warm-up):
    (a) sdpa_flash   F.scaled_dot_product_attention with the flash backend (the baseline)
    (b) eager        softmax(QK^T) materialised, weights returned (what peer projects do)
    (c) ours_last64  attention_with_importance, weights on the last 64 queries
    (d) ours_all     attention_with_importance, all queries (key-major pass 2)
Reports time, ratio to (a), the analytic ideal ratio, and peak memory above the inputs. Writes
a Markdown + JSON results file (GPU name, library versions, date) and a plot.

Analytic ideal (FLOPs, causal): the forward costs QK^T + PV = 2 units over the causal half; pass 2
recomputes QK^T (1 unit) for the weighted query blocks only: (c) 1 + 0.5 * rows_in_weighted_blocks
/ S-ish (tiny at 16k), (d) 1.5.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .attention import attention_with_importance


def _eager(q, k, v, causal):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = s.float().softmax(-1).to(q.dtype)
    return p @ v, p


def _sdpa(q, k, v, causal):
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _timed(fn, iters: int, device) -> tuple[float, int]:
    """(median seconds, peak bytes above what was allocated before)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
    return sorted(times)[len(times) // 2], peak


def run(seqs, heads, dim, dtype, causal, iters, device, last=64):
    rows = []
    for s in tqdm(seqs, desc="sequence lengths"):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, heads, s, dim, device=device, dtype=dtype, generator=g) for _ in range(3))
        w_last = torch.zeros(1, s, device=device)
        w_last[:, -last:] = 1
        variants = {
            "sdpa_flash": lambda: _sdpa(q, k, v, causal),
            "eager": lambda: _eager(q, k, v, causal),
            "ours_last64": lambda: attention_with_importance(q, k, v, causal=causal, query_weights=w_last),
            "ours_all": lambda: attention_with_importance(q, k, v, causal=causal, key_major=True),
        }
        ideal = {"sdpa_flash": 1.0, "eager": None, "ours_last64": 1 + 0.5 * min(1.0, 2 * 128 / s), "ours_all": 1.5}
        row = {"seq": s}
        for name, fn in variants.items():
            try:
                t, mem = _timed(fn, iters, device)
                row[name] = {"ms": t * 1e3, "peak_mib": mem / 2**20}
            except torch.OutOfMemoryError:
                row[name] = {"ms": None, "peak_mib": None, "error": "out of memory"}
                torch.cuda.empty_cache()
        base = row["sdpa_flash"]["ms"]
        for name in variants:
            ms = row[name]["ms"]
            row[name]["ratio_to_sdpa"] = None if ms is None else ms / base
            row[name]["ideal_ratio"] = ideal[name]
        rows.append(row)
    return rows


def environment(device) -> dict:
    import transformers
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "triton": triton_v, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "date": datetime.date.today().isoformat()}


def to_markdown(env: dict, rows: list, cfg: dict) -> str:
    lines = [f"# attention_with_importance benchmark — {env['device']}", "",
             ", ".join(f"{k}: {v}" for k, v in env.items()), "",
             f"config: {cfg}", "",
             "| seq | variant | ms | x SDPA-flash | ideal x | peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        for name in ["sdpa_flash", "eager", "ours_last64", "ours_all"]:
            v = r[name]
            f = lambda x, p=2: "—" if x is None else f"{x:.{p}f}"  # noqa: E731
            lines.append(f"| {r['seq']} | {name} | {f(v['ms'], 3)} | {f(v['ratio_to_sdpa'])} | {f(v['ideal_ratio'])} | "
                         f"{f(v['peak_mib'], 1)}{' (' + v['error'] + ')' if 'error' in v else ''} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ["sdpa_flash", "eager", "ours_last64", "ours_all"]:
        pts = [(r["seq"], r[name]["ms"]) for r in rows if r[name]["ms"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ms (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=os.path.join("runs", "kernels"),
                    help="folder for the results files (default: ./runs/kernels under the current directory)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing useful")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.seq, args.heads, args.dim, args.dtype, args.iters = [64, 128], 2, 16, "float32", 2
    elif device.type != "cuda":
        raise SystemExit("no CUDA device: this benchmark needs a GPU (use --smoke to check the script on CPU)")
    cfg = dict(heads=args.heads, dim=args.dim, dtype=args.dtype, causal=not args.no_causal, iters=args.iters)
    rows = run(args.seq, args.heads, args.dim, getattr(torch, args.dtype), not args.no_causal, args.iters, device)
    env = environment(device)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_{'smoke' if args.smoke else env['device'].replace(' ', '_')}_{env['date']}")
    with open(stem + ".json", "w") as f:
        json.dump({"env": env, "config": cfg, "rows": rows}, f, indent=1)
    md = to_markdown(env, rows, cfg)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(rows, stem + ".png")
    print(md)
    print(f"wrote {stem}.md / .json / .png")
    return stem


if __name__ == "__main__":
    main()

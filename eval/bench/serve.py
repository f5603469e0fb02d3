"""Throughput of ``vllm serve`` with tokensieve's plugin under load: requests/s and time to first token (p50, p99)
at several concurrencies, with no plan and with pruning plans, next to the token ideal.

    python -m tokensieve.eval.bench.serve --out runs/serve_bench                  # the full table (long)
    python -m tokensieve.eval.bench.serve --out /tmp/sb --layers 1 --vision-layers 1 \\
        --concurrency 1,2 --requests 4 --plans none,divprune:keep=0.25          # a smoke run
    python -m tokensieve.eval.bench.serve --model qwen2.5-vl-7b --out runs/serve_bench_qwen   # Qwen2.5-VL-7B widths

The model (``--model``, one of ``SERVED``): a real configuration (``configs/<model>.json``: LLaVA-1.5-7B by
default, or Qwen2.5-VL-7B) with random weights and its depth cut to ``--layers`` / ``--vision-layers``
(``models.bench_engine``), saved to a temporary directory and served by the vLLM environment
(``serving/vllm_env.sh``) with ``--trust-request-mm-kwargs``. Each request: an image of its own (the model's
bench image, pixel (0, 0) stamped per request: ``image_url``; 576 visual tokens on either model: LLaVA-1.5's
336 px image, 24 x 24 patches; Qwen2.5-VL's 672 px image, 48 x 48 patches of 14 px merged 2 x 2), the bench
prompt, ``--new-tokens`` greedy tokens, streamed; TTFT is the time to the first streamed token, requests/s the
requests finished over the wall time of the cell. The token ideal of a plan is
(prompt tokens without a plan) / (its prompt tokens): the speedup of a prefill whose cost is linear in tokens.
The client is the standard library (threads, http.client); results: ``serve_bench.json``, ``serve_bench.md``,
``serve_bench.png``.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VLLM = os.environ.get("TOKENSIEVE_VLLM_BIN", os.path.join(ROOT, ".venv-vllm", "bin", "vllm"))
PORT = 18478


SERVED = ("llava-1.5-7b", "qwen2.5-vl-7b")  # bench models whose family the plugin serves (serving/vllm_plugin.py)


def build_model(out: str, layers: int, vision_layers: int, name: str = "llava-1.5-7b") -> dict:
    """Save the reduced-depth random bench model ``name`` (model, processor) to ``out``; returns the bench request."""
    from .models import bench_engine

    engine, request = bench_engine(name, layers=layers, vision_layers=vision_layers, device="cpu")
    engine.model.save_pretrained(out)
    engine.processor.save_pretrained(out)
    return request


def image_url(request: dict, variant: int) -> str:
    """The bench image as a data URL, pixel (0, 0) stamped with ``variant`` (1 .. 2^24 - 1): each request sends an
    image of its own, as distinct users do. The same image again would be served from vLLM's caches: its
    encoder cache (no tower, no pruning) and its prefix cache, which on CPU reuses whole 128-token blocks, so a
    repeated 581-token prompt prefills 69 tokens, a 149-token one 21 and a 68-token one all 68 (docs/serving.md)."""
    if not 0 < variant < 1 << 24:
        raise ValueError(f"variant {variant} outside 1 .. 2^24 - 1")
    image = request["images"][0].convert("RGB")  # a copy
    image.putpixel((0, 0), (variant & 255, (variant >> 8) & 255, variant >> 16))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(model: str, log) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    return subprocess.Popen([VLLM, "serve", model, "--port", str(PORT), "--max-model-len", "1024", "--dtype", "float32",
                             "--trust-request-mm-kwargs", "--limit-mm-per-prompt", '{"image": 1}'],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, timeout: float = 900) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode} (see its log)")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(2)
    raise RuntimeError("vllm serve did not start in time")


def one_request(model: str, url: str, prompt: str, plan: str | None, new_tokens: int) -> dict:
    """One streamed chat request -> {"ttft", "latency", "prompt_tokens"} (seconds)."""
    body = {"model": model, "max_tokens": new_tokens, "temperature": 0, "stream": True, "logprobs": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": prompt}]}]}
    if plan:
        body["mm_processor_kwargs"] = {"plan": plan}
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    ttft, usage = None, None
    for line in resp:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        choice = (chunk.get("choices") or [{}])[0]
        if ttft is None and (choice.get("logprobs") or {}).get("content"):  # a generated token (its text may be "")
            ttft = time.perf_counter() - t0
        usage = chunk.get("usage") or usage
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "prompt_tokens": usage["prompt_tokens"]}


def cell(model: str, urls: list[str], prompt: str, plan: str | None, concurrency: int, new_tokens: int) -> dict:
    """One request per image of ``urls`` (each its own: ``image_url``), ``concurrency`` clients at once ->
    requests/s, TTFT p50 / p99, prompt tokens."""
    n = len(urls)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda url: one_request(model, url, prompt, plan, new_tokens), urls))
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in runs)
    return {"plan": plan or "none", "concurrency": concurrency, "requests": n, "rps": round(n / wall, 3),
            "ttft_p50": round(statistics.median(ttfts), 4), "ttft_p99": round(ttfts[min(n - 1, int(0.99 * n))], 4),
            "prompt_tokens": runs[0]["prompt_tokens"]}


def with_ideal(rows: list[dict]) -> list[dict]:
    """Each row's gain in requests/s over no plan at its concurrency, and the token ideal."""
    base = {r["concurrency"]: r for r in rows if r["plan"] == "none"}
    for r in rows:
        b = base.get(r["concurrency"])
        if b:
            r["gain"] = round(r["rps"] / b["rps"], 3)
            r["ideal"] = round(b["prompt_tokens"] / r["prompt_tokens"], 3)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| plan | concurrency | prompt tokens | requests/s | gain | token ideal | TTFT p50 (s) | TTFT p99 (s) |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    body = "".join(f"| {r['plan']} | {r['concurrency']} | {r['prompt_tokens']} | {r['rps']} | {r.get('gain', '')} | "
                   f"{r.get('ideal', '')} | {r['ttft_p50']} | {r['ttft_p99']} |\n" for r in rows)
    return f"vllm serve + tokensieve plugin, {meta['model']}, {meta['requests']} requests a cell\n\n" + head + body


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for plan in dict.fromkeys(r["plan"] for r in rows):
        mine = [r for r in rows if r["plan"] == plan]
        axes[0].plot([r["concurrency"] for r in mine], [r["rps"] for r in mine], marker="o", label=plan)
        axes[1].plot([r["concurrency"] for r in mine], [r["ttft_p50"] for r in mine], marker="o", label=plan)
    for ax, name in zip(axes, ("requests/s", "TTFT p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llava-1.5-7b", choices=SERVED, help="the bench model's configuration")
    ap.add_argument("--layers", type=int, default=4, help="LLM layers kept (LLaVA-1.5-7B has 32, Qwen2.5-VL-7B 28)")
    ap.add_argument("--vision-layers", type=int, default=4, help="vision tower layers kept (24; Qwen2.5-VL's 32)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--plans", default="none,divprune:keep=0.25,divprune:keep=0.11")
    ap.add_argument("--requests", type=int, default=64, help="requests per cell")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    if not os.path.isfile(VLLM):
        ap.error(f"no vLLM environment at {VLLM}: build it with `bash serving/vllm_env.sh`")
    plans = [None if p == "none" else p for p in args.plans.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    os.makedirs(args.out, exist_ok=True)
    model = tempfile.mkdtemp(prefix="tokensieve-serve-bench-")
    request = build_model(model, args.layers, args.vision_layers, args.model)
    variants = iter(range(1, 1 << 24))  # every request of the run, warm-up included, gets an image of its own
    log = open(os.path.join(args.out, "server.log"), "w")
    proc = start_server(model, log)
    rows = []
    meta = {"model": f"{args.model} widths, {args.layers} LLM / {args.vision_layers} vision layers, random weights",
            "requests": args.requests, "new_tokens": args.new_tokens}
    try:
        wait_ready(proc)
        for plan in plans:  # warm-up: each plan's prompt length once (a compiled server builds its graphs)
            one_request(model, image_url(request, next(variants)), request["prompt"], plan, 1)
        for c in concurrency:
            for plan in plans:
                urls = [image_url(request, next(variants)) for _ in range(args.requests)]  # encoded before the clock
                rows.append(cell(model, urls, request["prompt"], plan, c, args.new_tokens))
                print(json.dumps(rows[-1]), flush=True)
                with open(os.path.join(args.out, "serve_bench.json"), "w") as f:  # kept as it goes
                    json.dump({"meta": meta, "rows": with_ideal(list(rows))}, f, indent=1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
        shutil.rmtree(model, ignore_errors=True)
    rows = with_ideal(rows)
    with open(os.path.join(args.out, "serve_bench.md"), "w") as f:
        f.write(markdown(rows, meta))
    plot(rows, os.path.join(args.out, "serve_bench.png"))
    print(markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()

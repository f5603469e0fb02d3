"""Run in vLLM's environment by tests/test_vllm_plugin.py: start ``vllm serve`` on a shipped model with the
plugin, talk to it with the openai client, results as JSON; the server is stopped at the end.

    .venv-vllm/bin/python tests/vllm_serve_check.py MODEL_DIR IMAGE_PNG QUESTION out.json

Checks: a base64 image with a plan in extra_body (usage.prompt_tokens), the same streamed, 8 concurrent
clients with mixed plans, the server default plan (--mm-processor-kwargs) when a request gives none, bad plans
(each a 400 with the reason), and a good request after them.
"""
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PORT = 18477
PLANS = [None, "divprune:keep=0.25", "random:keep=16", "pool:keep=0.5"] * 2  # 8 clients
BAD = ["fastv:keep=0.25", "nope:keep=4", "divprune:keep=1000", ""]


def serve(model: str, log) -> subprocess.Popen:
    """``vllm serve`` in its own process group, the vLLM environment's CLI."""
    cli = os.path.join(os.path.dirname(sys.executable), "vllm")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([cli, "serve", model, "--port", str(PORT), "--max-model-len", "512", "--dtype", "float32",
                             "--enforce-eager", "--trust-request-mm-kwargs", "--limit-mm-per-prompt", '{"image": 1}',
                             "--mm-processor-kwargs", '{"plan": "uniform:keep=0.5"}'],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, timeout: float = 400) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(2)
    raise RuntimeError("vllm serve did not start in time")


def main(model: str, image: str, question: str, out_path: str) -> None:
    from openai import BadRequestError, OpenAI

    url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    log = open(out_path + ".server.log", "w")
    proc = serve(model, log)
    out = {}
    try:
        wait_ready(proc)
        client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none", max_retries=0)
        name = client.models.list().data[0].id

        def ask(plan, stream=False):
            extra = {"extra_body": {"mm_processor_kwargs": {"plan": plan}}} if plan is not None else {}
            r = client.chat.completions.create(model=name, messages=messages, max_tokens=2, temperature=0,
                                               stream=stream, **({"stream_options": {"include_usage": True}}
                                                                 if stream else {}), **extra)
            if not stream:
                return {"text": r.choices[0].message.content, "prompt_tokens": r.usage.prompt_tokens}
            chunks = list(r)
            return {"text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                    "prompt_tokens": next(c.usage.prompt_tokens for c in chunks if c.usage), "chunks": len(chunks)}

        out["full"] = ask("divprune:keep=1.0")
        out["default"] = ask(None)  # the server's --mm-processor-kwargs plan
        out["one"] = ask("divprune:keep=0.25")
        out["stream"] = ask("divprune:keep=0.25", stream=True)
        with ThreadPoolExecutor(8) as pool:
            out["concurrent"] = list(pool.map(ask, PLANS))
        out["alone"] = [ask(p) for p in PLANS[:4]]
        out["bad"] = []
        for plan in BAD:
            try:
                ask(plan)
                out["bad"].append({"plan": plan, "status": 200})
            except BadRequestError as e:
                out["bad"].append({"plan": plan, "status": e.status_code, "error": str(e)})
        out["after_bad"] = ask("divprune:keep=0.25")
        out["alive"] = proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:5])

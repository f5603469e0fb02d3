"""tokensieve's vLLM plugin (serving/), checked against tokensieve's own engine on the shipped models.

The vLLM side runs in vLLM's own environment (``.venv-vllm``, built by ``bash serving/vllm_env.sh``, which
.ci/run calls): ``tests/vllm_check.py`` starts ONE vLLM engine per model per session and runs every check
there; the engine side (the reference) runs here. Skipped, saying how to build it, only where that
environment is absent. The parts that need no vLLM engine: ``tests/test_vllm_plans.py``; Qwen2.5-VL and
Qwen3-VL: ``tests/test_vllm_qwen.py`` (on this file's machinery).
"""
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy
import pytest
import torch

import tokensieve
from tokensieve.engine.plan import Plan
from tokensieve.eval.shapeworld import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PYTHON = os.environ.get("TOKENSIEVE_VLLM_PYTHON", os.path.join(ROOT, ".venv-vllm", "bin", "python"))
MODELS = {"llava": "tiny-llava", "qwen2_vl": "tiny-qwen2-vl", "llava_next": None,  # None: make_tiny's random model
          "llava_onevision": None}
PLANS = ("divprune:keep=0.25", "random:keep=16", "uniform:keep=0.11", "pool:keep=0.5", "vidcom2:keep=0.25",
         "dycoke:keep=0.25")
TOWER_PLANS = {  # family -> plans reading the vision tower: LLaVA-1.5 records it, Qwen2-VL's pruners use surrogates
    "llava": ("cls:keep=0.25", "visionzip:keep=0.25", "tome:keep=0.25", "flowcut:where=pre_llm,keep=0.25",
              "rollout:where=pre_llm,keep=0.25", "vispruner:keep=0.25"),
    "qwen2_vl": ("cls:keep=0.25", "visionzip:keep=0.25", "tome:keep=0.25", "prumerge:keep=0.25"),
    "llava_next": ("cls:keep=0.25", "visionzip:keep=0.25", "tome:keep=0.25"),
    "llava_onevision": ("cls:keep=0.25", "visionzip:keep=0.25", "tome:keep=0.25"),  # SigLIP: surrogates
}
VIDEO_PLANS = ("", "dycoke:keep=0.25", "vidcom2:keep=0.25", "divprune:keep=0.11")
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")  # native video through the plugin (Qwen2.5-VL:
# tests/test_vllm_qwen.py)
NO_PLAN_VIDEO = {"qwen3_vl": ("",)}  # families whose videos run in vLLM without a plan only (a plan is refused)
N_QUESTIONS = 24  # world image questions, no plan, one batch
N_KEPT = 3  # questions run alone under each plan (kept sets compared)
BAD = ["fastv:keep=0.25", "nope:keep=4", "divprune:keep=1000", "divprune:keep=", "", 5, "mmtok:keep=0.25",
       "divprune:keep=auto,tau=0.5", "divprune:where=vision,layer=2,keep=0.5"]
BAD_REASON = ["inside the language model", "unknown pruner 'nope'", "larger than the 64 visual tokens", "keep must be",
              "is empty", "must be a plan string", "request.keywords", "keep=auto", "acts inside vLLM's vision tower"]


def vllm_env() -> str:
    """The vLLM environment's python; skip where serving/vllm_env.sh has not finished building it (its stamp)."""
    venv = os.path.dirname(os.path.dirname(VLLM_PYTHON))
    built = "TOKENSIEVE_VLLM_PYTHON" in os.environ or any(f.startswith(".tokensieve-vllm-") for f in os.listdir(venv)) \
        if os.path.isdir(venv) else False
    if not os.path.isfile(VLLM_PYTHON) or not built:
        pytest.skip(f"vLLM's environment is absent ({VLLM_PYTHON}): build it with `bash serving/vllm_env.sh` "
                    "(.ci/run does; about 5 minutes here, 3.5 GB)")
    return VLLM_PYTHON


def plans_of(family: str) -> tuple:
    return PLANS + TOWER_PLANS.get(family, ())


# ---- vLLM against the engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def vllm_vs_engine(shipped_engine):
    """family -> (questions, engine answers / kept sets, the vLLM run's JSON): one vLLM start per model. Its
    files live in a directory of its own (not pytest's numbered ones, which a concurrent pytest may rotate away)."""
    runs, dirs, engines = {}, [], []

    def get(family: str):
        if family not in runs:
            dirs.append(pathlib.Path(tempfile.mkdtemp(prefix=f"tokensieve-vllm-{family}-")))
            name = MODELS[family]
            if name:
                engine, path = shipped_engine(name), tokensieve.shipped.path(name)
            else:
                vllm_env()
                path = vllm_tiny(family, dirs[-1] / "model")
                engines.append(tokensieve.load(path))
                engine = engines[-1]
            runs[family] = _run(family, engine, dirs[-1], model=path)
        return runs[family]

    yield get
    for e in engines:
        e.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def vllm_tiny(family: str, folder: pathlib.Path) -> str:
    """``make_tiny``'s random model of ``family`` with 32-dim text attention heads (vLLM's CPU attention has no
    kernel for make_tiny's 16), re-drawn from the same seed."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    from tokensieve.testing import make_tiny

    path = make_tiny(family, folder)
    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config()
    text.num_attention_heads = text.num_key_value_heads = text.hidden_size // 32
    text.head_dim = 32
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():  # as make_tiny: a visible spread in the logits
        model.get_output_embeddings().weight.normal_(0, 0.5)
    model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval().save_pretrained(path)
    return str(path)


def _run(family, engine, tmp, model: str | None = None):
    """Every check of ``family`` in one vLLM start on ``model`` (default: the shipped checkpoint), and the engine's
    reference answers -> (questions, reference, the vLLM run's JSON)."""
    vllm_env()
    questions = report.held_out(n_images=N_QUESTIONS, n_videos=0)
    reqs = []
    for i, q in enumerate(questions):
        path = str(tmp / f"{i}.png")
        q.images[0].save(path)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}]
        reqs.append({"prompt": engine.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                                    tokenize=False), "image": path, "max_tokens": 2})
    ref = {"none": [engine.generate(q.question, images=q.images, max_new_tokens=2) for q in questions]}
    for p in plans_of(family):
        ref[p] = [engine.generate(q.question, images=q.images, plan=p, max_new_tokens=2)
                  for q in questions[:2 * N_KEPT]]
    singles = [[{**reqs[i], "plan": p}] for p in plans_of(family) for i in range(N_KEPT)]
    # one batch of images not seen before (vLLM's prefix cache would skip the encoder for seen ones) under every
    # plan, and seen images without a plan
    mixed = [{**reqs[N_KEPT + i], "plan": p} for p in plans_of(family) for i in range(N_KEPT)] + reqs[:N_KEPT]
    spec = {"model": model or tokensieve.shipped.path(MODELS[family]), "max_model_len": 1024,
            "calls": [reqs] + singles + [mixed], "bad": BAD, "after_bad": reqs[0]}
    video_plans = VIDEO_PLANS if family in VIDEO_FAMILIES else NO_PLAN_VIDEO.get(family, ())
    if video_plans:  # a world video, native (the family's frames), under each video plan
        video = report.held_out(n_images=0, n_videos=1)[0]
        numpy.save(tmp / "video.npy", numpy.stack([numpy.asarray(im.convert("RGB")) for im in video.images]))
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": video.question}]}]
        prompt = engine.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        meta = {"video_fps": 2.0} if family in ("qwen2_5_vl", "qwen3_vl") else {}  # the engine's rate for frames
        spec["video_calls"] = [[{"prompt": prompt, "video": str(tmp / "video.npy"), "max_tokens": 2, **meta,
                                 **({"plan": p} if p else {})}] for p in video_plans]
        ref["video"] = [engine.generate(video.question, video=video.images, plan=p or None, max_new_tokens=2)
                        for p in video_plans]
        if family in NO_PLAN_VIDEO:
            spec["bad_video"] = [p for p in VIDEO_PLANS if p]
    return questions, ref, {**_vllm_check(spec, tmp), "dir": str(tmp)}


def _vllm_check(spec: dict, tmp: pathlib.Path) -> dict:
    """Run tests/vllm_check.py on ``spec`` in the vLLM environment; its JSON."""
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([vllm_env(), os.path.join(ROOT, "tests", "vllm_check.py"), str(tmp / "spec.json"),
                           str(tmp / "out.json")], capture_output=True, text=True, timeout=900, cwd=str(tmp),
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("family", list(MODELS))
def test_the_plugin_is_loaded_by_vllm_itself(vllm_vs_engine, family):
    _, _, out = vllm_vs_engine(family)
    assert out["entry_point"] == ["tokensieve.serving.vllm_plugin:register"]
    assert out["model_class"].startswith("tokensieve.serving.vllm_"), out["model_class"]
    assert all(len(k) == 1 for k in out["kept"][1:-1]), ("each pruned request logs its kept set once",
                                                          [len(k) for k in out["kept"]])


@pytest.mark.parametrize("family", list(MODELS))
def test_no_plan_answers_as_the_engine(vllm_vs_engine, family):
    questions, ref, out = vllm_vs_engine(family)
    got = [r["token_ids"] for r in out["calls"][0]]
    want = [list(r.token_ids) for r in ref["none"]]
    assert got == want
    assert all(not k for k in out["kept"][0]), "no plan: nothing pruned"


def stock_checkpoint(src: str, folder: pathlib.Path) -> str:
    """A LLaVA-style checkpoint with its tower weights under the names stock vLLM expects
    (``vision_tower.vision_model.``; transformers 5 saves them without): the same model, loadable without the
    plugin's weight mapper."""
    import re

    from safetensors.torch import load_file, save_file

    for f in os.listdir(src):
        if f != "model.safetensors":
            shutil.copy(os.path.join(src, f), folder / f)
    weights = load_file(os.path.join(src, "model.safetensors"))
    tower = re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)")
    save_file({tower.sub(r"\1vision_model.", k): v for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return str(folder)


@pytest.mark.parametrize("family,arch", [("llava", "llava:LlavaForConditionalGeneration"),
                                         ("llava_next", "llava_next:LlavaNextForConditionalGeneration")])
def test_no_plan_answers_as_stock_vllm(vllm_vs_engine, family, arch):
    """The plugin's no-plan answers on the world's questions are stock vLLM's (no plugin loaded, the same model
    with the weight names stock vLLM reads), token for token."""
    _, _, out = vllm_vs_engine(family)
    spec = json.loads((pathlib.Path(out["dir"]) / "spec.json").read_text())
    folder = pathlib.Path(tempfile.mkdtemp(prefix="tokensieve-vllm-stock-"))
    try:
        spec = {"model": stock_checkpoint(spec["model"], folder), "max_model_len": spec["max_model_len"],
                "calls": spec["calls"][:1], "stock": True}
        stock = _vllm_check(spec, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert stock["model_class"] == "vllm.model_executor.models." + arch
    assert stock["calls"][0] == out["calls"][0]


def test_chunked_prefill_and_prefix_caching_give_the_same_answers_and_kept_sets(vllm_vs_engine):
    """The LLaVA run's single-plan and mixed-plan calls again, with the prompt prefilled in chunks of 16 tokens
    (each pruned prompt of about 30 to 80 tokens takes 2 to 5 steps, its image's kept features sliced across
    them) and prefix caching on, each call twice (the second served from the prefix cache where whole blocks
    match): the same tokens, prompt lengths and kept sets as the unchunked run."""
    _, _, out = vllm_vs_engine("llava")
    spec = json.loads((pathlib.Path(out["dir"]) / "spec.json").read_text())
    folder = pathlib.Path(tempfile.mkdtemp(prefix="tokensieve-vllm-chunked-"))
    calls = spec["calls"][1:]
    try:
        chunked = _vllm_check({"model": spec["model"], "max_model_len": spec["max_model_len"],
                               "calls": calls + calls, "llm_kwargs": {
                                   "enable_chunked_prefill": True, "max_num_batched_tokens": 16,
                                   "enable_prefix_caching": True}}, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    n = len(calls)
    for got in (chunked["calls"][:n], chunked["calls"][n:]):
        assert got == out["calls"][1:]
    key = lambda logs: sorted(json.dumps([k["plan"], k["kept"]]) for k in logs)  # noqa: E731
    assert [key(k) for k in chunked["kept"][:n]] == [key(k) for k in out["kept"][1:]]


@pytest.mark.parametrize("family", list(MODELS))
def test_each_plan_keeps_the_engines_kept_set(vllm_vs_engine, family):
    _, ref, out = vllm_vs_engine(family)
    n_visual = ref["none"][0].stats["visual_tokens"]
    for j, (p, i) in enumerate((p, i) for p in plans_of(family) for i in range(N_KEPT)):
        (logged,) = out["kept"][1 + j]
        assert logged["n"] == n_visual
        assert logged["kept"] == ref[p][i].kept[0].tolist(), (p, i)
        single = out["calls"][1 + j][0]
        assert single["prompt_len"] == out["calls"][0][i]["prompt_len"] - n_visual + len(logged["kept"])


@pytest.mark.parametrize("family", list(MODELS))
def test_a_batch_of_mixed_plans_keeps_the_engines_kept_sets(vllm_vs_engine, family):
    """One batch: every plan on images not seen before, and no plan: each request's prompt is its text + the
    kept tokens the engine keeps for its plan, the kept sets are the engine's, the unpruned requests answer as
    without the others (the plan of one request never leaks into another's)."""
    _, ref, out = vllm_vs_engine(family)
    n_visual = ref["none"][0].stats["visual_tokens"]
    mixed, unpruned = out["calls"][-1], out["calls"][0]
    pairs = [(p, N_KEPT + i) for p in plans_of(family) for i in range(N_KEPT)]
    assert [r["prompt_len"] for r in mixed[:len(pairs)]] == [
        unpruned[i]["prompt_len"] - n_visual + ref[p][i].kept[0].numel() for p, i in pairs]
    assert sorted(json.dumps([k["plan"], k["kept"]]) for k in out["kept"][-1]) == sorted(
        json.dumps([str(Plan.parse(p)), ref[p][i].kept[0].tolist()]) for p, i in pairs)
    assert mixed[len(pairs):] == unpruned[:N_KEPT]


@pytest.mark.parametrize("family", [f for f in VIDEO_FAMILIES if f in MODELS])
def test_a_native_video_keeps_the_engines_kept_sets(vllm_vs_engine, family):
    """A world video as the family's native video: no plan answers as the engine; under dycoke, vidcom2 and
    divprune vLLM keeps the engine's kept set (its frames: Qwen2-VL's temporal patches, OneVision's pooled
    frames), with text + kept tokens in the prompt."""
    check_video(vllm_vs_engine(family))


def check_video(run) -> None:
    """``run`` (``_run``'s result) of a native-video family: the video checks above."""
    _, ref, out = run
    calls, kept = out["video_calls"], out["video_calls_kept"]
    n_visual = ref["video"][0].stats["visual_tokens"]
    assert calls[0][0]["token_ids"] == list(ref["video"][0].token_ids) and kept[0] == []
    for p, call, logged, r in list(zip(VIDEO_PLANS, calls, kept, ref["video"]))[1:]:
        assert [k["kept"] for k in logged] == [r.kept[0].tolist()] and logged[0]["n"] == n_visual, p
        assert call[0]["prompt_len"] == calls[0][0]["prompt_len"] - n_visual + r.kept[0].numel()
        assert call[0]["token_ids"] == list(r.token_ids), p


@pytest.mark.parametrize("family", list(MODELS))
def test_bad_plans_get_one_clear_error_and_vllm_keeps_serving(vllm_vs_engine, family):
    _, ref, out = vllm_vs_engine(family)
    n_visual = ref["none"][0].stats["visual_tokens"]
    for bad, reason in zip(out["bad"], BAD_REASON):
        reason = reason.replace("the 64 visual", f"the {n_visual} visual")
        assert bad["error"] is not None and "tokensieve: " in bad["error"] and reason in bad["error"], bad
    assert out["after_bad"]["token_ids"] == out["calls"][0][0]["token_ids"]


# ---- vllm serve with the openai client -----------------------------------------------------------------------
SERVE_BAD_REASON = ["inside the language model", "unknown pruner 'nope'", "larger than the 64 visual tokens", "is empty"]


@pytest.fixture(scope="session")
def served():
    """``tests/vllm_serve_check.py``'s JSON: one ``vllm serve`` of tiny-llava (default plan uniform:keep=0.5)."""
    python = vllm_env()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tokensieve-vllm-serve-"))
    q = report.held_out(n_images=1, n_videos=0)[0]
    q.images[0].save(tmp / "image.png")
    proc = subprocess.run([python, os.path.join(ROOT, "tests", "vllm_serve_check.py"), tokensieve.shipped.path("tiny-llava"),
                           str(tmp / "image.png"), q.question, str(tmp / "out.json")], capture_output=True, text=True,
                          timeout=900, cwd=str(tmp))
    log = (tmp / "out.json.server.log").read_text()[-4000:] if (tmp / "out.json.server.log").exists() else ""
    assert proc.returncode == 0, proc.stderr[-4000:] + log
    yield json.loads((tmp / "out.json").read_text())
    shutil.rmtree(tmp, ignore_errors=True)


def test_vllm_serve_prunes_per_request_through_the_openai_api(served):
    """A base64 image with the plan in extra_body: usage.prompt_tokens = text + kept tokens; the server's
    --mm-processor-kwargs plan applies where a request gives none; streaming gives the same answer."""
    full = served["full"]["prompt_tokens"]  # divprune:keep=1.0: all 64 visual tokens
    assert served["one"]["prompt_tokens"] == full - 64 + 16
    assert served["default"]["prompt_tokens"] == full - 64 + 32
    stream = served["stream"]
    assert stream["chunks"] > 1 and (stream["text"], stream["prompt_tokens"]) == (served["one"]["text"],
                                                                                   served["one"]["prompt_tokens"])


def test_vllm_serve_answers_8_concurrent_clients_with_mixed_plans_as_each_alone(served):
    assert served["concurrent"] == served["alone"] * 2


def test_vllm_serve_answers_a_bad_plan_with_a_400_and_keeps_serving(served):
    for bad, reason in zip(served["bad"], SERVE_BAD_REASON):
        assert bad["status"] == 400 and "tokensieve: " in bad["error"] and reason in bad["error"], bad
    assert served["after_bad"] == served["one"] and served["alive"]


def test_serve_bench_puts_each_gain_next_to_its_token_ideal():
    """eval/bench/serve.py's table: gain = requests/s over no plan at the same concurrency, ideal = prompt
    tokens without a plan over the plan's (numbers worked by hand)."""
    from tokensieve.eval.bench import serve

    rows = serve.with_ideal([
        {"plan": "none", "concurrency": 1, "rps": 2.0, "prompt_tokens": 600, "ttft_p50": 1, "ttft_p99": 1},
        {"plan": "divprune:keep=0.25", "concurrency": 1, "rps": 5.0, "prompt_tokens": 168, "ttft_p50": 1, "ttft_p99": 1},
        {"plan": "none", "concurrency": 8, "rps": 4.0, "prompt_tokens": 600, "ttft_p50": 1, "ttft_p99": 1},
        {"plan": "divprune:keep=0.25", "concurrency": 8, "rps": 6.0, "prompt_tokens": 168, "ttft_p50": 1, "ttft_p99": 1}])
    assert [(r["gain"], r["ideal"]) for r in rows] == [(1.0, 1.0), (2.5, 3.571), (1.0, 1.0), (1.5, 3.571)]
    assert "| divprune:keep=0.25 | 8 | 168 | 6.0 | 1.5 | 3.571 |" in serve.markdown(rows, {"model": "m", "requests": 4})


def test_serve_bench_sends_each_request_an_image_of_its_own():
    """A repeated image would be served from vLLM's encoder and prefix caches (whole 128-token blocks on CPU),
    not measured: each variant decodes to the bench image with only pixel (0, 0) changed, and no two are alike."""
    import base64
    import io

    from PIL import Image

    from tokensieve.eval.bench import serve

    base = Image.new("RGB", (8, 8), (10, 20, 30))
    urls = [serve.image_url({"images": [base]}, v) for v in (1, 2, 256, (1 << 24) - 1)]
    assert len(set(urls)) == 4 and base.getpixel((0, 0)) == (10, 20, 30)
    images = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in urls]
    assert [im.getpixel((0, 0)) for im in images] == [(1, 0, 0), (2, 0, 0), (0, 1, 0), (255, 255, 255)]
    assert all(im.getpixel((x, y)) == (10, 20, 30) for im in images for x in range(8) for y in range(8) if (x, y) != (0, 0))
    with pytest.raises(ValueError):
        serve.image_url({"images": [base]}, 0)

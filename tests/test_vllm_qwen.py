"""tokensieve's vLLM plugin on Qwen2.5-VL (and Qwen3-VL, below) against tokensieve's own engine and stock vLLM.

The checkpoints are tiny random ones written by ``tokensieve.testing.make_tiny`` (LM heads widened for vLLM's CPU
attention: ``vllm_tiny``); the
checks are test_vllm_plugin.py's (one vLLM start per model, ``tests/vllm_check.py``), plus stock vLLM (no plugin)
on the same checkpoint: no plan answers as it, images and video. Skipped, saying how to build it, only where
vLLM's environment is absent.
"""
import json
import pathlib
import shutil
import tempfile

import pytest

import test_vllm_plugin as base
import tokensieve
from tokensieve.engine.adapters import family_module
from tokensieve.testing import make_tiny

FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def vllm_tiny(family: str, folder: pathlib.Path) -> str:
    """``make_tiny``'s checkpoint of ``family`` with attention heads of 32 channels in its LM (2 heads, M-RoPE
    sections doubled): vLLM's CPU attention has no kernel for make_tiny's 16 ("Unsupported CPU attention
    configuration: head_dim=16"); everything else is make_tiny's."""
    module = family_module(family)
    text = module.tiny_text

    def wide_heads(tok):
        cfg = text(tok)
        rope = dict(cfg["rope_parameters"], mrope_section=[2 * s for s in cfg["rope_parameters"]["mrope_section"]])
        return {**cfg, "num_attention_heads": 2, "num_key_value_heads": 2, "rope_parameters": rope,
                **({"head_dim": 32} if "head_dim" in cfg else {})}

    with pytest.MonkeyPatch.context() as m:
        m.setattr(module, "tiny_text", wide_heads)
        return make_tiny(family, folder)


@pytest.fixture(scope="session")
def qwen_vs_engine():
    """family -> ``base._run``'s (questions, engine reference, the vLLM run's JSON): one vLLM start per model."""
    runs, dirs, engines = {}, [], []

    def get(family: str):
        if family not in runs:
            base.vllm_env()
            dirs.append(pathlib.Path(tempfile.mkdtemp(prefix=f"tokensieve-vllm-{family}-")))
            model = vllm_tiny(family, dirs[-1] / "model")
            engines.append(tokensieve.load(model))
            runs[family] = base._run(family, engines[-1], dirs[-1], model=model)
        return runs[family]

    yield get
    for e in engines:
        e.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_plugin_is_loaded_by_vllm_itself(qwen_vs_engine, family):
    base.test_the_plugin_is_loaded_by_vllm_itself(qwen_vs_engine, family)
    assert qwen_vs_engine(family)[2]["model_class"].startswith(f"tokensieve.serving.vllm_{family}:")


@pytest.mark.parametrize("family", FAMILIES)
def test_no_plan_answers_as_the_engine(qwen_vs_engine, family):
    base.test_no_plan_answers_as_the_engine(qwen_vs_engine, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_plan_keeps_the_engines_kept_set(qwen_vs_engine, family):
    base.test_each_plan_keeps_the_engines_kept_set(qwen_vs_engine, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_mixed_plans_keeps_the_engines_kept_sets(qwen_vs_engine, family):
    base.test_a_batch_of_mixed_plans_keeps_the_engines_kept_sets(qwen_vs_engine, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_plans_get_one_clear_error_and_vllm_keeps_serving(qwen_vs_engine, family):
    base.test_bad_plans_get_one_clear_error_and_vllm_keeps_serving(qwen_vs_engine, family)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in base.VIDEO_FAMILIES])
def test_a_native_video_keeps_the_engines_kept_sets(qwen_vs_engine, family):
    """A world video, native: no plan answers as the engine; under dycoke, vidcom2 and divprune the engine's kept
    set (its frames: the temporal patches), text + kept tokens in the prompt, the engine's answer."""
    base.check_video(qwen_vs_engine(family))


def test_a_qwen3_vl_video_runs_without_a_plan_and_a_plan_on_it_is_refused(qwen_vs_engine):
    """Qwen3-VL's video placeholder interleaves timestamp text with the frames' tokens, which the plugin does not
    shrink: without a plan the video answers as the engine (stock vLLM: below); each video plan gets one clear
    error (the next requests are still served: the image checks after it)."""
    _, ref, out = qwen_vs_engine("qwen3_vl")
    assert out["video_calls"][0][0]["token_ids"] == list(ref["video"][0].token_ids)
    assert out["video_calls_kept"] == [[]]
    assert [b["plan"] for b in out["bad_video"]] == [p for p in base.VIDEO_PLANS if p]
    for bad in out["bad_video"]:
        assert bad["error"] and "tokensieve: " in bad["error"] and "mixes token ids" in bad["error"], bad
    assert out["after_bad"]["token_ids"] == out["calls"][0][0]["token_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_no_plan_answers_as_stock_vllm(qwen_vs_engine, family):
    """The plugin's no-plan answers (the world's image questions, and the video where the family has it) are stock
    vLLM's on the same checkpoint (no plugin loaded: vLLM's own model class and its own positions), token for
    token, prompt for prompt."""
    _, _, out = qwen_vs_engine(family)
    spec = json.loads((pathlib.Path(out["dir"]) / "spec.json").read_text())
    folder = pathlib.Path(tempfile.mkdtemp(prefix="tokensieve-vllm-stock-"))
    try:
        stock_spec = {"model": spec["model"], "max_model_len": spec["max_model_len"], "calls": spec["calls"][:1],
                      "stock": True, **({"video_calls": spec["video_calls"][:1]} if "video_calls" in spec else {})}
        stock = base._vllm_check(stock_spec, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert stock["model_class"].startswith("vllm.model_executor.models."), stock["model_class"]
    assert stock["calls"][0] == out["calls"][0]
    if "video_calls" in spec:
        assert stock["video_calls"][0] == out["video_calls"][0]


# ---- the serve bench at Qwen2.5-VL-7B widths (eval/bench/serve.py --model qwen2.5-vl-7b) ---------------------------
def test_the_serve_bench_sends_qwen2_5_vl_576_visual_tokens_as_llava():
    """The bench image of Qwen2.5-VL-7B through its bench processor (the served checkpoint's): 672 px = 48 x 48
    patches of 14 px, merged 2 x 2 = 576 visual tokens (worked by hand), LLaVA-1.5's count; no model is built."""
    from tokensieve.eval.bench import models
    from tokensieve.testing import tokenizer_for

    tok = tokenizer_for("qwen2_5_vl")
    cfg = models._config("qwen2.5-vl-7b", tok, 1, 1)
    request = models._request("qwen2.5-vl-7b")
    out = family_module("qwen2_5_vl").processor(cfg, tok)(images=request["images"], text=["<|image_pad|>"])
    assert out["image_grid_thw"].tolist() == [[1, 48, 48]]
    assert list(out["input_ids"][0]).count(cfg.image_token_id) == 576


def test_the_serve_bench_builds_the_model_it_is_asked_for_and_refuses_others_before_any_work(tmp_path, monkeypatch):
    """``--model qwen2.5-vl-7b`` builds that bench model (``build_model`` stopped there: no server starts); a model
    the plugin does not serve is an argparse error before anything is written."""
    import sys

    from tokensieve.eval.bench import serve

    asked = []

    def build(out, layers, vision_layers, name="llava-1.5-7b"):
        asked.append((name, layers, vision_layers))
        raise KeyboardInterrupt  # stop before the server

    monkeypatch.setattr(serve, "VLLM", sys.executable)
    monkeypatch.setattr(serve, "build_model", build)
    with pytest.raises(KeyboardInterrupt):
        serve.main(["--out", str(tmp_path / "q"), "--model", "qwen2.5-vl-7b", "--layers", "1", "--vision-layers", "1"])
    assert asked == [("qwen2.5-vl-7b", 1, 1)]
    with pytest.raises(SystemExit):
        serve.main(["--out", str(tmp_path / "out"), "--model", "qwen3-vl-8b"])
    assert not (tmp_path / "out").exists()


# ---- DeepStack channels through a plan (serving/plans.py, pure) ----------------------------------------------------
@pytest.mark.parametrize("plan", ["divprune:keep=0.25", "random:keep=5", "pool:keep=0.25", "pool:keep=0.5;pool:keep=0.5"])
def test_extra_channels_ride_along_as_the_mean_of_the_originals_each_token_stands_for(plan):
    """Qwen3-VL's DeepStack channels: the plan reads the main channels only; each kept token carries its own extra
    channels, a merged one the mean over its originals. With extra = the tokens themselves, the reference is the
    pruner's own output: selected rows, or pool's merged tokens (a mean of originals, sizes weighted)."""
    import torch

    from tokensieve.engine.plan import Plan
    from tokensieve.serving import plans

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(64, 8, generator=gen)
    coords = torch.stack([torch.zeros(64, dtype=torch.long), torch.arange(64) // 8, torch.arange(64) % 8], dim=1)
    kept, alone = plans.select(Plan.parse(plan), tokens, coords)
    kept2, both = plans.select(Plan.parse(plan), tokens, coords, extra=tokens.clone())
    assert kept2.tolist() == kept.tolist() and both.shape == (kept.numel(), 16)
    assert torch.equal(both[:, :8], alone)
    torch.testing.assert_close(both[:, 8:], alone, rtol=1e-5, atol=1e-6)

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

FAMILIES = ("qwen2_5_vl",)


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

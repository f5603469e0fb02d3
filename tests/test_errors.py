"""Bad input: one clear error naming the problem, raised before any model work."""
import pytest

import tokensieve
from conftest import model_calls, noise_image
from tokensieve import InputError, PlanError, UnsupportedModelError


@pytest.fixture
def engine(engine_for):
    e = engine_for("llava")
    with model_calls(e) as calls:
        yield e, calls


def _raises(engine_calls, exc, match, **kw):
    engine, calls = engine_calls
    good = dict(prompt="what colour", images=[noise_image(0)])
    with pytest.raises(exc, match=match):
        engine.generate_batch([good, dict(good, **kw)])  # the good request must not run either
    assert calls == [], "model work started before the error"


def test_missing_image(engine, tmp_path):
    _raises(engine, InputError, r"image 0: file not found: .*nope\.png", images=[str(tmp_path / "nope.png")])


def test_unreadable_image(engine, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    _raises(engine, InputError, r"image 0: cannot read image .*bad\.png", images=[str(bad)])


def test_image_count_mismatch(engine):
    _raises(engine, InputError, r"prompt has 2 '<image>' placeholder\(s\) but 1 image\(s\)",
            prompt="<image> and <image> what", images=[noise_image(1)])


def test_unknown_pruner(engine):
    _raises(engine, PlanError, r"stage 0: unknown pruner 'magic'; known: .*fastv", plan="magic:keep=3")


def test_layer_out_of_range(engine):
    _raises(engine, PlanError, r"stage 0 \(fastv \(LLM layer 7.*LLM layer must be in \[1, 3\]", plan="fastv:layer=7,keep=3")
    _raises(engine, PlanError, r"vision layer must be in \[1, 2\]", plan="uniform:where=vision,layer=5,keep=3")


def test_keep_too_large_and_nonpositive(engine):
    _raises(engine, PlanError, r"request 1: stage 0 \(uniform .*keep=65 is larger than the 64 visual tokens entering it",
            plan="uniform:keep=65")
    _raises(engine, PlanError, r"stage 1 .*keep=20 is larger than the 10 visual tokens", plan="uniform:keep=10;fastv:layer=2,keep=20")
    _raises(engine, PlanError, r"keep must be > 0", plan="fastv:layer=2,keep=0")


def test_bad_generation_options(engine):
    engine_, calls = engine
    with pytest.raises(InputError, match=r"unknown generation option\(s\) \['num_beams'\]"):
        engine_.generate("what", images=[noise_image(0)], num_beams=4)
    with pytest.raises(InputError, match="max_new_tokens must be a positive int"):
        engine_.generate("what", images=[noise_image(0)], max_new_tokens=0)
    assert calls == []


def test_unsupported_model_lists_families(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=50)).save_pretrained(tmp_path)
    # the families sorted: a new one (internvl) may come before llava
    with pytest.raises(UnsupportedModelError,
                       match="'llama' is not supported; supported families: (.+, )?llava, llava_next"):
        tokensieve.load(str(tmp_path))


def test_bad_plan_fails_before_loading(tmp_path):
    with pytest.raises(PlanError, match="unknown pruner"):
        tokensieve.load(str(tmp_path / "does-not-exist"), plan="nope:keep=1")


def test_close_removes_every_hook(tiny_path):
    engine = tokensieve.load(tiny_path("llava"))
    modules = list(engine.model.modules())
    assert any(m._forward_pre_hooks for m in modules)
    assert engine.model.config.text_config._attn_implementation == "tokensieve"
    engine.close()
    assert not any(m._forward_pre_hooks for m in modules)
    assert engine.model.config.text_config._attn_implementation == "sdpa"


def test_engine_wraps_a_model_loaded_by_the_user(tiny_path):
    """Engine(model, processor) on a plain transformers model: FastV still gets its attention rows."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path = tiny_path("qwen2_vl")
    model, proc = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    with tokensieve.Engine(model, proc) as engine:
        res = engine.generate("what", images=[noise_image(0)], plan="fastv:layer=2,keep=4", max_new_tokens=2)
    assert len(res.kept[0]) == 4 and res.scores[0] is not None

"""Model variants the tiny defaults do not cover, each against plain transformers: a LLaVA whose
projector receives the CLS hidden state (``vision_feature_select_strategy="full"``), a model with no
end-of-sequence token anywhere, and the public ``tokensieve.testing`` helper after a bare import."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText

import tokensieve
from conftest import noise_image
from tokensieve import PlanError
from tokensieve.testing import make_tiny


def _edit_json(path, name, **changes):
    f = f"{path}/{name}"
    data = json.load(open(f))
    data.update(changes)
    json.dump(data, open(f, "w"))


def _hf_greedy(path, inputs, n):
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), torch.stack(out.logits, 1)[0].float()


@pytest.fixture(scope="module")
def full_llava(tmp_path_factory):
    path = make_tiny("llava", tmp_path_factory.mktemp("llava_full"))
    _edit_json(path, "config.json", vision_feature_select_strategy="full")
    _edit_json(path, "processor_config.json", vision_feature_select_strategy="full")
    engine = tokensieve.load(path)
    yield path, engine
    engine.close()


def test_full_strategy_no_plan_matches_transformers(full_llava):
    path, engine = full_llava
    inputs = engine.prepare("what is the colour of the circle", images=[noise_image(0)])
    tokens, logits = _hf_greedy(path, inputs, 5)
    res = engine.generate("what is the colour of the circle", images=[noise_image(0)], max_new_tokens=5,
                          output_logits=True)
    assert res.stats["visual_tokens"] == 65  # the CLS hidden state is a visual token too
    assert res.token_ids == tokens[:len(res.token_ids)]
    torch.testing.assert_close(res.logits, logits[:len(res.token_ids)], atol=2e-4, rtol=1e-4)


def test_full_strategy_scores_patches_and_refuses_vision_stages(full_llava):
    _, engine = full_llava
    res = engine.generate("what", images=[noise_image(1)], plan="cls:keep=10", max_new_tokens=1)
    assert res.kept[0].numel() == 10 and float(res.scores[0][0]) == 0.0  # the CLS slot has no CLS attention
    assert 0 not in res.kept[0].tolist()
    res = engine.generate("what", images=[noise_image(1)], plan="fastv:layer=2,keep=12", max_new_tokens=1)
    assert res.kept[0].numel() == 12
    with pytest.raises(PlanError, match="vision_feature_select_strategy='default'"):
        engine.generate("what", images=[noise_image(1)], plan="cls:where=vision,layer=1,keep=10")


def test_no_end_of_sequence_token_generates_to_the_limit(tmp_path):
    path = make_tiny("llava", tmp_path / "noeos")
    _edit_json(path, "generation_config.json", eos_token_id=None)
    _edit_json(path, "config.json", eos_token_id=None)
    _edit_json(path, "tokenizer_config.json", eos_token=None)
    engine = tokensieve.load(path)
    try:
        assert engine.processor.tokenizer.eos_token_id is None and engine.eos_ids == set()
        inputs = engine.prepare("what", images=[noise_image(2)])
        res = engine.generate("what", images=[noise_image(2)], max_new_tokens=4)
        assert len(res.token_ids) == 4
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert res.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()
    finally:
        engine.close()


def test_testing_helper_after_a_bare_import(tmp_path):
    code = f"import tokensieve; print(tokensieve.testing.make_tiny('llava', {str(tmp_path / 'm')!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "m" / "config.json").exists()

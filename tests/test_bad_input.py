"""A battery of bad and edge inputs: each gets one of tokensieve's errors, naming the field, before any model
work; images are converted faithfully, pixel by pixel against conversions computed here."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tokensieve
from conftest import model_calls
from tokensieve import InputError, Plan, PlanError, TokenSieveError

SCENE = os.path.join(os.path.dirname(__file__), "..", "examples", "scene.png")
GOOD = {"prompt": "what colour is the circle ?", "images": [SCENE]}


@pytest.fixture(scope="module")
def engine():
    e = tokensieve.load()  # the shipped tiny LLaVA: 4 LLM layers, 64 visual tokens per image
    with model_calls(e) as calls:
        yield e, calls
    e.close()


# ---- plans ------------------------------------------------------------------------------------------
PLANS = [
    ("nosuch:keep=0.5", "unknown pruner 'nosuch'"),
    ("cls:keep=nan", "keep must be an int count or a ratio"),
    ("cls:keep=inf", "keep must be an int count or a ratio"),
    ("cls:keep=0", "keep must be > 0"),
    ("cls:keep=-3", "keep must be > 0"),
    ("cls:keep=1.5", r"a ratio keep must be in \(0, 1\]"),
    ("cls:keep=true", "keep must be an int count or a ratio"),
    ("cls:keep=abc", "keep must be an int count or a ratio"),
    ("uniform:keep=auto", "keep=auto needs an adaptive pruner"),
    ("prumerge:keep=auto;uniform:keep=32", "after a keep=auto stage, give keep as a ratio"),
    ("random:keep=0.5,seed=abc", r"stage 0 \(random\): seed must be an int >= 0, got 'abc'"),
    ("random:keep=0.5,seed=-1", "seed must be an int >= 0, got -1"),
    ("random:keep=0.5,seed=1.5", "seed must be an int >= 0, got 1.5"),
    ("fastv:layer=2,layer=3,keep=0.2", "option 'layer' is given twice"),
    (";;", r"empty stage \(a stray ';'\)"),
    ("uniform:keep=0.5;;fastv:layer=2,keep=0.5", r"empty stage \(a stray ';'\)"),
    ("uniform:keep=0.5;", r"empty stage \(a stray ';'\)"),
    ("uniform:keep=0.5,foo=1", r"unknown option\(s\) \['foo'\]"),
    ("uniform:keep", "option 'keep' is not key=value"),
    ("fastv:layer=two,keep=0.5", "layer must be an int"),
    ("uniform:where=moon,keep=0.5", "where must be one of"),
    ("fastv:where=pre_llm,keep=0.5", "fastv cannot act at 'pre_llm'"),
    ("fastvid:keep=0.2,tau=2", r"tau must be a number in \[-1, 1\], got 2.0"),
    ("fastvid:keep=0.2,c=0", "c must be an int >= 1, got 0"),
    ("keyscore:keep=0.2,weights=1/2", "weights takes 3 values"),
    ("keyscore:keep=0.2,weights=1/-2/3", "weights must be 3 numbers >= 0"),
    ("keyscore:keep=0.2,temporal=foo", "temporal must be one of video, representative, distinct, got 'foo'"),
    ("keyscore:keep=0.2,temperature=0", "temperature must be a number >= 1e-06"),
    ("quota:keep=0.2,within=nope", "within: unknown pruner 'nope'"),
    ("quota:keep=0.2,within=fastv", "reads LLM attention"),
    ("quota:keep=0.2,decouple=maybe", "decouple must be true or false, got 'maybe'"),
    ("quota:keep=0.2,scorer_batch=0", "scorer_batch must be an int >= 1"),
    ("feather:layer=2,keep=0.5,stride=-1", "stride must be an int >= 0, got -1"),
    ("visionzip:keep=32,contextual=-1", "contextual must be an int >= 0"),
    ("dycoke:keep=0.5,window=1", "window must be an int >= 2"),
    ("cls:keep=32,layers=a/b", "layers must be one or more ints"),
    ("sparsevlm:layer=2,keep=0.5,recycle=nan", "recycle must be a finite number"),
    (42, "cannot build a plan from int"),
    ([{"pruner": "uniform", "keep": 8}, "fastv"], "stage 1 is not a dict"),
    ([{"keep": 8}], "stage 0: no pruner named"),
]


@pytest.mark.parametrize("spec, words", PLANS, ids=[str(p)[:40] for p, _ in PLANS])
def test_bad_plans(spec, words):
    with pytest.raises(PlanError, match=words):
        Plan.parse(spec)


@pytest.mark.parametrize("name, content, words", [
    ("missing.yaml", None, "plan file not found: .*missing.yaml"),
    ("bad.yaml", b"- pruner: uniform\n  keep: [0.5\n", r"bad.yaml: not valid YAML .*line \d+, column \d+"),
    ("bad.json", b'[{"pruner": "uniform", "keep": }]', r"bad.json: not valid JSON .*line 1, column \d+"),
    ("latin.yaml", b"- pruner: uniform\n  keep: 0.5 # \xe9\xff\n", "latin.yaml: not UTF-8"),
    ("dict.yaml", b"pruner: uniform\nkeep: 0.5\n", "expected a list of stages"),
    ("badopt.json", b'[{"pruner": "random", "keep": 0.5, "seed": "x"}]', "seed must be an int"),
])
def test_bad_plan_files(tmp_path, name, content, words):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PlanError, match=words):
        Plan.parse(str(path))


def test_plan_options_are_normalised_as_declared():
    plan = Plan.parse("keyscore:keep=0.2,weights=1/2/3,window=3;uniform:keep=0.5")
    assert plan.stages[0].options == {"weights": [1.0, 2.0, 3.0], "window": 3}
    assert str(Plan.parse("fastvid:keep=0.2,tau=1")) == "fastvid:where=pre_llm,keep=0.2,tau=1.0"
    assert not Plan.parse("") and not Plan.parse("  ")  # the empty plan (no pruning) stays allowed


# ---- requests and generation options -------------------------------------------------------------------
def _npimg(dtype, value, shape=(16, 16, 3)):
    return np.full(shape, value, dtype=dtype)


REQUESTS = [  # (changes to a good request, or generation options, expected error, words)
    ({"prompt": ""}, InputError, "prompt must be a non-empty string"),
    ({"prompt": None}, InputError, "prompt must be a non-empty string"),
    ({"prompt": "   "}, InputError, "prompt must be a non-empty string"),
    ({"images": ["/nonexistent/x.png"]}, InputError, "image 0: file not found"),
    ({"images": [os.path.abspath(__file__)]}, InputError, "image 0: cannot read image"),
    ({"images": [np.zeros(5, np.uint8)]}, InputError, r"image 0: an array of shape \[5\]"),
    ({"images": [np.zeros((2, 8, 8, 3), np.uint8)]}, InputError, r"an array of shape \[2, 8, 8, 3\]"),
    ({"images": [_npimg(np.int64, 300)]}, InputError, r"int64 array .* values in \[300, 300\]"),
    ({"images": [_npimg(np.int32, -1)]}, InputError, r"values in \[-1, -1\]"),
    ({"images": [_npimg(np.float32, 2.0)]}, InputError, r"float images must hold values in \[0, 1\]"),
    ({"images": [_npimg(np.float32, np.nan)]}, InputError, "NaN or infinite"),
    ({"images": [np.zeros((3, 16, 16), np.float32)]}, InputError, r"permute\(1, 2, 0\)"),
    ({"images": [np.zeros((0, 16, 3), np.uint8)]}, InputError, "an empty image array"),
    ({"images": [np.zeros((16, 16, 3), np.complex64)]}, InputError, "dtype complex64"),
    ({"images": [42]}, InputError, "expected an image path, a PIL image or an array"),
    ({"images": [Image.fromarray(np.full((8, 8), 2.5, np.float32), "F")]}, InputError, r"values in \[2.5, 2.5\]"),
    ({"prompt": "<image> and <image> what"}, InputError, r"2 '<image>' placeholder\(s\) but 1 image\(s\)"),
    ({"prompt": "what " * 3000}, InputError, "exceed the model's context of 2048 positions"),
    ({"plan": "fastv:layer=9,keep=0.5"}, PlanError, r"LLM layer must be in \[1, 3\]"),
    ({"plan": "uniform:keep=1000"}, PlanError, "keep=1000 is larger than the 64 visual tokens"),
    ({"plan": "quota:keep=0.5"}, PlanError, "needs a request with a video"),
    ({"plan": "priority:keep=0.5"}, PlanError, "give the request a priority"),
    ({"plan": "priority:keep=0.5", "priority": [1.0] * 10}, InputError, "priority has 10 values but .* 64 visual"),
    ({"plan": "priority:keep=0.5", "priority": [float("nan")] * 64}, InputError, "finite numbers"),
    ({"priority": [[1.0] * 8] * 8}, InputError, r"1-D list of finite numbers, got shape \(8, 8\)"),
    ({"priority": "high"}, InputError, "priority must be numbers"),
    ({"plan": ";;"}, PlanError, "stray"),
    ({"max_new_tokens": True}, InputError, "max_new_tokens must be a positive int, got True"),
    ({"max_new_tokens": 0}, InputError, "max_new_tokens must be a positive int, got 0"),
    ({"max_new_tokens": 2.5}, InputError, "max_new_tokens must be a positive int"),
    ({"video_mode": "x"}, InputError, "video_mode must be one of"),
    ({"video": "/nonexistent/clip.mp4"}, InputError, "video: file not found"),
    ({"video": np.zeros((4, 8, 8), np.uint8)}, InputError, r"\[T, H, W, 3\] uint8"),
    ({"colour": "red"}, InputError, r"unknown field\(s\) \['colour'\]"),
]


@pytest.mark.parametrize("change, exc, words", REQUESTS, ids=[str(c)[:40] for c, _, _ in REQUESTS])
def test_bad_requests_name_the_request_and_run_nothing(engine, change, exc, words):
    e, calls = engine
    calls.clear()
    with pytest.raises(exc, match="request 2: .*" + words):
        e.generate_batch([GOOD, GOOD, dict(GOOD, **change)], batch_size=2)
    assert calls == [], "model work started before the error"


OPTIONS = [
    ({"temperature": "hot"}, "temperature must be a number > 0, got 'hot'"),
    ({"temperature": float("nan")}, "temperature must be a number > 0, got nan"),
    ({"temperature": 0}, "temperature must be a number > 0, got 0"),
    ({"seed": "abc"}, "seed must be an int >= 0, got 'abc'"),
    ({"seed": -2}, "seed must be an int >= 0"),
    ({"top_k": 2.5}, "top_k must be an int >= 1, got 2.5"),
    ({"top_k": True}, "top_k must be an int >= 1, got True"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
    ({"do_sample": "yes"}, "do_sample must be True or False"),
    ({"num_beams": 3}, r"unknown generation option\(s\) \['num_beams'\]"),
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"batch_size": -1}, "batch_size must be an int >= 1, got -1"),
    ({"batch_size": 2.0}, "batch_size must be an int >= 1"),
]


@pytest.mark.parametrize("options, words", OPTIONS, ids=[str(o)[:30] for o, _ in OPTIONS])
def test_bad_generation_options_fail_before_the_model(engine, options, words):
    e, calls = engine
    calls.clear()
    with pytest.raises(InputError, match=words):
        e.generate_batch([GOOD], **options)
    assert calls == []


def test_bad_batches(engine):
    e, _ = engine
    for requests, words in (([], "non-empty list"), ("what", "non-empty list"), ([{"images": [SCENE]}], "'prompt'")):
        with pytest.raises(InputError, match=words):
            e.generate_batch(requests)


def test_a_closed_engine_refuses_before_running(tmp_path):
    e = tokensieve.load()
    e.close()
    for call in (lambda: e.generate(GOOD["prompt"], images=GOOD["images"], plan="fastv:layer=1,keep=0.5"),
                 lambda: e.prepare(GOOD["prompt"], images=GOOD["images"]),
                 lambda: e.loglikelihood(GOOD["prompt"], "red", images=GOOD["images"])):
        with pytest.raises(InputError, match="this engine is closed"):
            call()


# ---- load() ---------------------------------------------------------------------------------------------
def _partial_checkpoint(tmp_path):
    src = tokensieve.default_model()
    (tmp_path / "ckpt").mkdir()
    for name in os.listdir(src):
        if name == "config.json" or name.endswith(".safetensors"):
            (tmp_path / "ckpt" / name).write_bytes(open(os.path.join(src, name), "rb").read())
    return str(tmp_path / "ckpt")


LOADS = [
    (lambda t: dict(model=123), "model must be a hub id or a local directory .*got int 123"),
    (lambda t: dict(model=""), "model is an empty string"),
    (lambda t: dict(model="/nonexistent/dir"), "model '/nonexistent/dir': no such directory"),
    (lambda t: dict(model="./relative/nowhere"), "no such directory"),
    (lambda t: dict(model=SCENE), "is a file, not a checkpoint directory"),
    (lambda t: dict(model=str(t)), "is not a checkpoint: it has no config.json"),
    (lambda t: dict(model=_partial_checkpoint(t)), r"not a complete checkpoint: missing tokenizer files .*processor"),
    (lambda t: dict(dtype="nn"), "dtype must be one of float32, .* got 'nn'"),
    (lambda t: dict(dtype=3), "dtype must be one of"),
    (lambda t: dict(device="gpu0"), "device must be cpu, cuda, cuda:N"),
    (lambda t: dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (lambda t: dict(video_mode="movie"), "video_mode must be one of"),
    (lambda t: dict(plan="cls:keep=nan"), "keep must be an int count or a ratio"),
]


@pytest.mark.parametrize("make, words", LOADS, ids=[str(i) for i in range(len(LOADS))])
def test_bad_load_arguments(tmp_path, make, words):
    with pytest.raises(TokenSieveError, match=words):
        tokensieve.load(**make(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it():
    with pytest.raises(InputError, match="CUDA is not available on this machine"):
        tokensieve.load(device="cuda")


def test_a_hub_id_offline_and_not_cached(tmp_path):
    code = ("import tokensieve\n"
            "try:\n    tokensieve.load('nobody/not-a-model')\n"
            "except tokensieve.InputError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "ERR model 'nobody/not-a-model': not a local directory, and it is not in the Hugging Face cache" in out.stdout


# ---- faithful conversion -------------------------------------------------------------------------------
def _rgb(a):
    from tokensieve.engine.images import load_image

    return np.asarray(load_image(a, "image 0"))


def test_images_are_converted_faithfully(tmp_path):
    rng = np.random.default_rng(0)
    u16 = rng.integers(0, 65536, (6, 7), dtype=np.uint16)
    f32 = rng.random((6, 7, 3), dtype=np.float32)
    path16 = tmp_path / "deep.png"
    Image.fromarray(u16).save(path16)  # a 16-bit grayscale PNG
    want16 = np.repeat(np.rint(u16 / 65535 * 255).astype(np.uint8)[..., None], 3, axis=-1)
    assert Image.open(path16).mode.startswith("I")
    np.testing.assert_array_equal(_rgb(str(path16)), want16)
    np.testing.assert_array_equal(_rgb(u16), want16)
    np.testing.assert_array_equal(_rgb(f32), np.rint(f32.astype(np.float64) * 255).astype(np.uint8))
    np.testing.assert_array_equal(_rgb(torch.from_numpy(f32)), np.rint(f32.astype(np.float64) * 255).astype(np.uint8))
    mode_f = Image.fromarray(f32[..., 0], "F")
    np.testing.assert_array_equal(_rgb(mode_f)[..., 1], np.rint(f32[..., 0].astype(np.float64) * 255).astype(np.uint8))
    mask = rng.random((6, 7)) > 0.5
    np.testing.assert_array_equal(_rgb(mask)[..., 2], mask.astype(np.uint8) * 255)
    i64 = rng.integers(0, 256, (6, 7, 3))
    np.testing.assert_array_equal(_rgb(i64), i64.astype(np.uint8))
    rgba = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    np.testing.assert_array_equal(_rgb(rgba), rgba[..., :3])
    gray1 = rng.integers(0, 256, (6, 7, 1), dtype=np.uint8)
    np.testing.assert_array_equal(_rgb(gray1), np.repeat(gray1, 3, axis=-1))


def test_the_model_sees_a_float_image_as_its_uint8_twin(engine):
    e, _ = engine
    u8 = np.asarray(Image.open(SCENE).convert("RGB"))
    as_float = u8.astype(np.float32) / 255
    a = e.prepare(GOOD["prompt"], images=[u8])["pixel_values"]
    b = e.prepare(GOOD["prompt"], images=[as_float])["pixel_values"]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---- the CLI -------------------------------------------------------------------------------------------
def test_cli_errors_are_one_line_and_debug_shows_the_traceback():
    cmd = [sys.executable, "-m", "tokensieve", "run", "--image", SCENE, "--prompt", "what", "--plan", "random:keep=0.5,seed=abc"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and lines == ["error: stage 0 (random): seed must be an int >= 0, got 'abc'"]
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "PlanError" in debug.stderr


def test_cli_lists_the_pruners_and_their_options():
    from tokensieve.pruners import REGISTRY

    out = subprocess.run([sys.executable, "-m", "tokensieve", "pruners"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    names = [line.split(":")[0] for line in out.stdout.splitlines() if line and not line.startswith(" ")]
    assert names == sorted(REGISTRY)
    assert "    tau: a number in [-1, 1], default 0.9:" in out.stdout
    assert "    seed: an int >= 0, default none:" in out.stdout


def test_readme_bad_input_paragraph_names_what_is_refused():
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for words in ("duplicate", "context", "16-bit", "float"):
        assert words in text.split("Bad input gets one error")[1][:2000], words


def test_json_of_a_plan_file_roundtrips(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps([{"pruner": "uniform", "keep": 32}, {"pruner": "fastv", "layer": 2, "keep": 0.5}]))
    assert str(Plan.parse(str(path))) == "uniform:where=pre_llm,keep=32;fastv:where=llm,layer=2,keep=0.5"

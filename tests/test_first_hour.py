"""What a new user trips over in the first hour (issue 43): shipped model names, words the default model was
never trained on, default layers the model does not have, text-only requests, the batch API's defaults, a
readable Result, and where ``tokensieve bench`` writes."""
import os
import random
import subprocess
import sys

import pytest
import torch

import tokensieve
from conftest import noise_image
from tokensieve.engine.errors import InputError, PlanError
from tokensieve.eval.shapeworld import phrasing, shipped, world
from tokensieve.pruners import REGISTRY

SCENE = os.path.join(os.path.dirname(__file__), "..", "examples", "scene.png")


@pytest.fixture(scope="module")
def default_engine():
    engine = tokensieve.load()
    yield engine
    engine.close()


# ---- item 3: shipped model names -------------------------------------------------------------------
@pytest.mark.parametrize("name,key", [("tiny-llava", "llava"), ("tiny-qwen2-vl", "qwen2_vl")])
def test_load_takes_the_shipped_names(name, key):
    engine = tokensieve.load(name)
    try:
        assert os.path.samefile(engine.model.name_or_path, shipped.path(key))
        assert engine.model.config.model_type == key
    finally:
        engine.close()


def test_tiny_clip_is_not_a_vlm_and_a_typo_names_the_shipped_models():
    with pytest.raises(InputError, match="open_clip model"):
        tokensieve.load("tiny-clip")
    with pytest.raises(InputError, match="tiny-llava, tiny-qwen2-vl"):
        tokensieve.load("tiny-lava")


def test_keyscore_clip_option_takes_the_shipped_name(default_engine):
    pytest.importorskip("open_clip")
    named, _, _ = default_engine.frame_scorers.clip("tiny-clip")
    default, _, _ = default_engine.frame_scorers.clip(None)
    assert named is default  # the same shipped checkpoint, loaded once


def test_cli_model_flag_takes_a_shipped_name():
    proc = subprocess.run([sys.executable, "-m", "tokensieve", "run", "--model", "tiny-qwen2-vl", "--image", SCENE,
                           "--prompt", "What color is the circle?", "--plan", "", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"answer": "red"' in proc.stdout


# ---- item 2: words the model was never trained on -----------------------------------------------------
def world_words() -> set[str]:
    """The words of the world's questions, collected here from the world itself (not from the checkpoint)."""
    rng, words = random.Random(1), set()
    for _ in range(500):
        for qa in world.image_questions(world.random_scene(rng), rng):
            words.update(qa.question.split())
    for _ in range(100):
        for qa in world.video_questions(world.random_video(rng, n_frames=8), rng):
            words.update(qa.question.split())
    return words


@pytest.mark.parametrize("question,unknown", [
    ("How many shapes are there?", ["shapes"]),
    ("Describe the image.", ["describe"]),
    ("What color is the circle?", []),
    ("Is there a red star, please?", []),
])
def test_result_names_the_words_the_default_model_never_saw(default_engine, question, unknown):
    res = default_engine.generate(question, images=[SCENE], max_new_tokens=2)
    assert res.unknown_words == unknown
    assert not set(unknown) & world_words()  # an unknown word is outside the world's question vocabulary


def test_questions_typed_the_ways_the_model_was_trained_on_are_understood(default_engine):
    rng, asked = random.Random(7), []
    for _ in range(40):
        for qa in world.image_questions(world.random_scene(rng), rng):
            asked.append(phrasing.rephrase(qa.question, rng))
    results = default_engine.generate_batch([{"prompt": q, "images": [SCENE]} for q in asked], batch_size=64,
                                            max_new_tokens=1)
    assert all(r.unknown_words == [] for r in results), [(q, r.unknown_words) for q, r in zip(asked, results)
                                                         if r.unknown_words][:5]


def test_cli_prints_one_note_for_words_not_understood():
    proc = subprocess.run([sys.executable, "-m", "tokensieve", "run", "--image", SCENE, "--prompt",
                           "How many shapes are there?", "--plan", ""], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert notes == ["note: not understood: shapes (words the model was never trained on; it ignores them)"]


def test_run_help_states_the_worlds_limits():
    out = subprocess.run([sys.executable, "-m", "tokensieve", "run", "--help"], capture_output=True, text=True).stdout
    for word in ("circle", "purple", "grey", "one word", "not understood"):
        assert word in " ".join(out.split()), word


def test_a_real_checkpoint_reports_no_unknown_words(engine_for):
    res = engine_for("llava").generate("Describe this photograph in detail.", images=[noise_image(0)],
                                       max_new_tokens=1)
    assert res.unknown_words == []  # no trained_words.json: nothing is claimed


# ---- item 4: default layers, text-only requests ----------------------------------------------------------
def test_a_default_layer_the_model_lacks_is_refused_with_the_range_and_a_suggestion(default_engine):
    n = default_engine.adapter.text_config.num_hidden_layers
    with pytest.raises(PlanError) as e:
        default_engine.check_plan("feather:keep=0.25")
    assert f"give layer= in [1, {n - 1}], e.g. layer=1" in str(e.value) and "default layer 8" in str(e.value)
    with pytest.raises(PlanError, match=r"default layer 15 .* e\.g\. layer=2"):
        default_engine.check_plan("aim:where=llm,keep=0.25")


def test_every_pruner_follows_the_one_default_layer_rule(default_engine):
    n = default_engine.adapter.text_config.num_hidden_layers
    for name, cls in REGISTRY.items():
        if "llm" not in cls.wheres or cls.default_layer is None:
            continue
        plan = f"{name}:where=llm,keep=0.5"
        if cls.default_layer < n:  # the paper's layer exists here: it is used as it is
            assert tokensieve.Plan.parse(plan).stages[0].layer == cls.default_layer
            default_engine.check_plan(plan)
        else:
            with pytest.raises(PlanError, match=rf"give layer= in \[1, {n - 1}\], e\.g\. layer=\d"):
                default_engine.check_plan(plan)


def test_a_text_only_request_with_the_default_plans_runs(default_engine):
    plain = default_engine.generate("what colour is the circle ?", max_new_tokens=3, plan=None)
    for plan in ("uniform:keep=0.25", "divprune:keep=16", "fastv:layer=2,keep=0.5"):
        res = default_engine.generate("what colour is the circle ?", max_new_tokens=3, plan=plan)
        assert res.token_ids == plain.token_ids and res.stats["visual_tokens"] == res.stats["kept_tokens"] == 0
        assert not res.plan  # nothing to prune: run unpruned


def test_a_text_only_request_still_gets_its_plan_checked(default_engine):
    with pytest.raises(PlanError, match="LLM layer must be in"):
        default_engine.generate("hello", plan="fastv:layer=9,keep=0.5")


# ---- item 9: the batch API takes what the single one takes -------------------------------------------------
def test_generate_batch_takes_max_new_tokens_and_a_default_plan(default_engine):
    asked = [{"prompt": "what colour is the circle ?", "images": [SCENE]},
             {"prompt": "how many red objects are there ?", "images": [SCENE], "plan": "", "max_new_tokens": 1},
             {"prompt": "is there a red circle ?", "images": [SCENE]}]
    got = default_engine.generate_batch(asked, max_new_tokens=3, plan="uniform:keep=0.25")
    # the same requests, each setting its own: what the defaults must mean
    own = [dict(a, plan=a.get("plan", "uniform:keep=0.25"), max_new_tokens=a.get("max_new_tokens", 3)) for a in asked]
    want = [default_engine.generate_batch([r])[0] for r in own]
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.stats["kept_tokens"] for r in got] == [16, 64, 16]
    assert [str(r.plan) for r in got] == [str(r.plan) for r in want]


def test_generate_batch_unknown_option_message_is_true(default_engine):
    with pytest.raises(InputError) as e:
        default_engine.generate_batch([{"prompt": "x"}], max_new=3)
    supported = str(e.value).split("supported: ")[1].split(", ")
    assert {"plan", "max_new_tokens", "do_sample"} <= set(supported)
    for name in supported:  # every option the message names is taken
        value = {"plan": "", "max_new_tokens": 1, "do_sample": False, "output_logits": False, "temperature": 1.0,
                 "top_k": 5, "top_p": 0.9, "seed": 0}[name]
        default_engine.generate_batch([{"prompt": "what colour is the circle ?"}], **{name: value})


def test_generate_batch_checks_its_defaults_before_any_work(default_engine):
    with pytest.raises(InputError, match="max_new_tokens must be a positive int"):
        default_engine.generate_batch([{"prompt": "x"}], max_new_tokens=0)
    with pytest.raises(PlanError, match="unknown pruner"):
        default_engine.generate_batch([{"prompt": "x"}], plan="nosuch:keep=0.5")


# ---- item 7: a readable Result ----------------------------------------------------------------------------
def test_result_repr_is_a_short_summary(default_engine):
    res = default_engine.generate("How many shapes are there?", images=[SCENE], plan="divprune:keep=0.25",
                                  max_new_tokens=2, output_logits=True)
    text = repr(res)
    assert len(text) < 300 and "\n" not in text and "tensor" not in text
    assert f"text={res.text!r}" in text and "kept=16/64 visual tokens" in text
    assert "prefill=" in text and "ms" in text and "not understood: shapes" in text
    assert isinstance(res.kept[0], torch.Tensor) and res.logits is not None  # the data stays in the fields


# ---- item 6: tokensieve bench writes where the user is ---------------------------------------------------
def test_bench_writes_under_the_current_directory_by_default(tmp_path, monkeypatch):
    from tokensieve.eval.bench import command as bench

    package_results = os.path.join(os.path.dirname(os.path.dirname(bench.__file__)), "results", "bench")
    before = set(os.listdir(package_results)) if os.path.isdir(package_results) else set()
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--models", "tiny", "--repeats", "1", "--new-tokens", "2", "--dtype", "float32",
                       "--device", "cpu", "--plans", ";;uniform:keep=0.5"]) == 0
    written = os.listdir(tmp_path / "runs" / "bench")
    assert {os.path.splitext(f)[1] for f in written} == {".json", ".md", ".png"}
    assert (set(os.listdir(package_results)) if os.path.isdir(package_results) else set()) == before

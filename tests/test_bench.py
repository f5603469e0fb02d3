"""``tokensieve bench`` on the tiny configuration: the files it writes, the round-robin order of the timed
runs, and the ratios it derives (checked against the rows it reports)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tokensieve.eval.bench import command as bench, models as bench_models


def test_bench_runs_on_the_tiny_configuration(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "tokensieve", "bench", "--models", "tiny", "--repeats", "1", "--new-tokens", "3",
           "--dtype", "float32", "--batch-sizes", "1,2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = next(p for p in os.listdir(out) if p.endswith(".json"))[:-5]
    results = json.load(open(out / f"{stem}.json"))
    assert (out / f"{stem}.md").exists() and (out / f"{stem}.png").stat().st_size > 10_000
    rows = results["models"]["tiny"]["1"]
    engine, request = bench_models.bench_engine("tiny")
    assert [r["plan"] for r in rows] == ["(none)"] + bench.plans_for(engine, request)[0][1:]
    base = rows[0]
    for r in rows:
        assert r["prefill_speedup"] == base["prefill_s"] / r["prefill_s"]
        assert r["prefill_ideal"] == base["prefill_flops"] / r["prefill_flops"]
        assert r["vision_s"] > 0 and r["prefill_s"] > 0 and r["decode_tok_s"] > 0
    kept = {r["plan"]: r["kept_tokens"] for r in rows}
    assert kept["fastv:layer=2,keep=0.111111"] == kept["fastv:layer=2,keep=0.111111,scoring=eager"] == 7
    assert results["models"]["tiny"]["2"][0]["prefill_flops"] == 2 * base["prefill_flops"]
    assert "of ideal" in open(out / f"{stem}.md").read()


def test_repeats_run_round_robin_after_a_warm_up(monkeypatch):
    calls = []

    def fake(engine, clock, request, plan, batch, new_tokens):
        calls.append(plan)
        return {"vision_s": 1.0, "prefill_s": 1.0 / (1 + len(plan)), "ttft_s": 1.0, "decode_tok_s": 1.0,
                "peak_bytes": 0, "kept_tokens": 1, "visual_tokens": 1, "kv_cache_bytes": 1, "prefill_flops": 1,
                "vision_flops": 1, "new_tokens": 1}

    class Clock:
        def __init__(self, engine):
            pass

        def close(self):
            pass

    monkeypatch.setattr(bench, "measure", fake)
    monkeypatch.setattr(bench, "ModuleClock", Clock)
    bench.run(None, {}, ["", "a", "bb"], batch=1, repeats=3, new_tokens=1)
    assert calls == ["", "a", "bb"] + ["", "a", "bb"] + ["a", "bb", ""] + ["bb", "", "a"]


def test_bad_arguments_are_one_line_before_any_model_is_built(capsys):
    for argv, words in ((["--models", "nosuch"], "unknown model(s) ['nosuch']"),
                        (["--models", "tiny", "--plans", ";;cls:keep=nan"], "keep must be"),
                        (["--batch-sizes", "0"], "--batch-sizes must be positive ints")):
        assert bench.main(argv) == 2
        assert words in capsys.readouterr().err


def test_plans_are_those_the_engine_accepts(engine_for):
    """The engine's fit checks choose each model's plans (no model names): FlowCut's vision stages only on
    LLaVA-1.5; the video methods only for a video request; every other plan everywhere."""
    import numpy as np

    from conftest import noise_image

    image, video = {"images": [noise_image(0)]}, {"video": np.zeros((4, 32, 32, 3), np.uint8)}
    image_plans, video_plans = bench.candidate_plans(video=False), bench.candidate_plans(video=True)
    flowcut = ["flowcut:keep=0.333333", "flowcut:keep=0.222222", "flowcut:keep=0.111111"]
    videos = [f"{m}:keep={k}" for m in ("dycoke", "fastvid", "keyscore", "vidcom2", "holitom", "prunevid") for k in ("0.25", "0.1")]
    videos += [f"framefusion:layer=2,keep={k}" for k in ("0.25", "0.1")]
    assert video_plans == image_plans + videos and all(p in image_plans for p in flowcut)
    assert bench.plans_for(engine_for("llava"), image) == (image_plans, {})
    for family, request, every in (("llava_next", image, image_plans), ("qwen2_5_vl", image, image_plans),
                                   ("llava_onevision", video, video_plans)):
        kept, left_out = bench.plans_for(engine_for(family), request)
        assert kept == [p for p in every if p not in flowcut], family
        assert list(left_out) == flowcut and all("flowcut" in why for why in left_out.values()), family


def test_a_plan_the_engine_refuses_is_left_out_with_its_reason():
    from tokensieve.engine.errors import PlanError

    class Engine:
        def check_plan(self, plan):
            if "tome" in plan:
                raise PlanError(f"no merging here ({plan})")

    kept, left_out = bench.plans_for(Engine(), {"images": []})
    assert kept == [p for p in bench.candidate_plans(video=False) if "tome" not in p]
    assert left_out == {p: f"no merging here ({p})" for p in bench.candidate_plans(video=False) if "tome" in p}
    results = {"env": {"device": "cpu", "date": "today"}, "models": {"m": {}}, "left_out": {"m": left_out}}
    assert "- `tome:keep=0.333333`: no merging here (tome:keep=0.333333)" in bench.markdown(results)


@pytest.mark.parametrize("name", list(bench_models.bench_families()))
def test_every_bench_configuration_builds_at_full_and_reduced_depth(name):
    """Each bench model's file gives a model transformers builds (on the meta device: no memory) with the file's
    widths; cut to 4 + 4 layers, the cut keeps every DeepStack tower layer inside the tower (Qwen3-VL)."""
    import json
    import os

    from transformers import AutoModelForImageTextToText

    from tokensieve.testing import tokenizer_for

    raw = json.load(open(os.path.join(os.path.dirname(bench_models.__file__), "configs", f"{name}.json")))
    tok = tokenizer_for(bench_models.bench_families()[name])
    for layers in (None, 4):
        cfg = bench_models._config(name, tok, layers, layers)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(cfg)
        text = cfg.get_text_config()
        assert text.hidden_size == raw["text_config"]["hidden_size"]
        assert text.num_hidden_layers == (raw["text_config"]["num_hidden_layers"] if layers is None else 4)
        ds = getattr(cfg.vision_config, "deepstack_visual_indexes", None)
        if ds:  # distinct tower layers, all inside the tower, as many as the file's while the depth allows
            assert len(set(ds)) == len(ds) == len(raw["vision_config"]["deepstack_visual_indexes"])
            assert max(ds) < cfg.vision_config.depth and len(model.model.visual.deepstack_merger_list) == len(ds)


@pytest.mark.parametrize("name", list(bench_models.bench_families()))
def test_every_bench_configuration_takes_the_test_tokenizers_placeholder_ids(name):
    """The bench prompt goes through the test tokenizer, so the model's image / video token ids must be its ids,
    under whichever name the file gives them (Gemma 3's file says ``image_token_id``, its config class stores
    ``image_token_index``): a real checkpoint's id left in would leave the prompt with no visual tokens."""
    from tokensieve.engine.adapters import family_module
    from tokensieve.testing import tokenizer_for

    family = bench_models.bench_families()[name]
    tok = tokenizer_for(family)
    cfg = bench_models._config(name, tok, 1, 1)
    for field, token in family_module(family).PLACEHOLDERS.items():
        assert getattr(cfg, field) == tok.convert_tokens_to_ids(token), (field, token)


@pytest.mark.parametrize("family", sorted(set(bench_models.bench_families().values())))
def test_the_module_clock_times_every_bench_family(family, engine_for):
    """The bench's forward hooks find each bench family's vision tower and language model (SmolVLM names them
    ``vision_model`` / ``text_model``): one generate gives tower time, a prefill and one LLM call per later token."""
    from conftest import noise_image

    engine = engine_for(family)
    clock = bench.ModuleClock(engine)
    try:
        res = engine.generate("what is the colour", images=[noise_image(0)], max_new_tokens=3)
        took = clock.take()
    finally:
        clock.close()
    assert took["vision"] > 0 and took["prefill"] > 0
    assert len(took["decode_calls"]) == res.stats["new_tokens"] - 1


def test_the_gpu_script_covers_every_bench_model():
    """``eval/bench/gpu.sh`` names every registered family's bench model (and nothing the bench does not know)."""
    import re

    script = open(os.path.join(os.path.dirname(bench_models.__file__), "gpu.sh")).read()
    named = {m for models in re.findall(r"--models (\S+)", script) for m in models.split(",")} - {"tiny"}
    assert named == set(bench_models.bench_families())

"""``tokensieve bench`` on the tiny configuration: the files it writes, the round-robin order of the timed
runs, and the ratios it derives (checked against the rows it reports)."""
import json
import os
import subprocess
import sys

from tokensieve.eval import bench


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
    assert [r["plan"] for r in rows] == ["(none)"] + bench.plans_for("tiny")[1:]
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

"""``tokensieve tune``: the Pareto fronts and the choice on hand-made calibration tables (answers worked out by
hand), its bad input before any model work, and the whole command on a tiny calibration set of the world:
the plan file it writes is the plan the table says meets the target, other commands take it, a second run
resumes, and an unreachable target names the best reachable."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from tokensieve.engine.plan import Plan
from tokensieve.eval.tune import command as tune, front


def row(plan, acc, flops, ms, se=0.02, kept=10):
    return dict(plan=plan, accuracy=acc, stderr=se, prefill_flops=flops, prefill_s=ms / 1000, kept_tokens=kept)


TABLE = [row("(full)", 0.80, 100, 50), row("a", 0.80, 60, 45), row("b", 0.79, 30, 40), row("c", 0.70, 20, 35),
         row("d", 0.75, 40, 20), row("e", 0.60, 25, 60)]
# by hand: FLOPs front = a (0.80 @ 60), b (0.79 @ 30), c (0.70 @ 20); d (0.75 @ 40) is beaten by b, e by c, full by a.
# time front = d (0.75 @ 20 ms), b (0.79 @ 40 ms), a (0.80 @ 45 ms); c (35 ms, 0.70) is beaten by d.


def test_pareto_fronts_are_the_undominated_plans():
    assert [r["plan"] for r in front.pareto(TABLE, "prefill_flops")] == ["c", "b", "a"]
    assert [r["plan"] for r in front.pareto(TABLE, "prefill_s")] == ["d", "b", "a"]


@pytest.mark.parametrize("target, plan", [
    (front.Target(max_accuracy_drop=1), "b"),  # b drops 1 point at 0.3 of the FLOPs
    (front.Target(max_accuracy_drop=0.5), "a"),  # only a and the full run are within half a point; a is cheaper
    (front.Target(max_accuracy_drop=10), "c"),  # c drops 10 points at 0.2
    (front.Target(max_accuracy_drop=0), "a"),
    (front.Target(latency_ms=30), "d"),  # d is the only plan at <= 30 ms
    (front.Target(latency_ms=45), "a"),  # a, b, c, d meet it: a is the most accurate
    (front.Target(flops_ratio=0.35), "b"),  # b, c, e: b is the most accurate
])
def test_the_choice_meets_the_target_at_the_best_other_value(target, plan):
    assert front.choose(TABLE, target)["plan"] == plan


def test_a_target_no_plan_meets_names_the_best_reachable():
    with pytest.raises(front.NoPlanMeets, match=r"fastest is d at 20.0 ms \(accuracy 75.0 %\)"):
        front.choose(TABLE, front.Target(latency_ms=10))
    with pytest.raises(front.NoPlanMeets, match=r"cheapest is c at 0.200 x"):
        front.choose(TABLE, front.Target(flops_ratio=0.1))


def test_a_choice_within_its_standard_errors_is_flagged():
    loose = [dict(r, stderr=0.10) for r in TABLE]
    warning = front.ranking_warning(loose, front.choose(loose, front.Target(max_accuracy_drop=1)), front.Target(max_accuracy_drop=1))
    assert "too small to rank" in warning and "14.1" in warning  # sqrt(10^2 + 10^2) points
    tight = [dict(r, stderr=0.001) for r in TABLE]
    assert front.ranking_warning(tight, front.choose(tight, front.Target(max_accuracy_drop=2)),
                                 front.Target(max_accuracy_drop=2)) is None


@pytest.mark.parametrize("args, message", [
    (["--max-accuracy-drop", "-1"], "must be >= 0"),
    (["--latency-ms", "0"], "must be > 0"),
    (["--max-accuracy-drop", "1", "--pruners", "nosuch", "--budgets", "0.5"], "unknown pruner 'nosuch'"),
    (["--max-accuracy-drop", "1", "--budgets", "2"], "ratio keep must be in (0, 1]"),
    (["--max-accuracy-drop", "1", "--data", "/nonexistent.jsonl"], "calibration set not found"),
    (["--max-accuracy-drop", "1", "--limit", "3"], "3 sample(s): too few to rank plans"),
])
def test_bad_input_is_one_error_before_any_model_work(tmp_path, capsys, monkeypatch, args, message):
    import tokensieve
    monkeypatch.setattr(tokensieve, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert tune.main(args + ["--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


def test_tune_on_a_tiny_calibration_set(tmp_path):
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "tokensieve", "tune", "--max-accuracy-drop", "20", "--pruners", "uniform",
           "--budgets", "0.25", "--limit", "10", "--nframes", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in open(out / "calibration" / "samples.jsonl")]
    assert len(records) == 20 and {r["plan"] for r in records} == {"", "uniform:where=pre_llm,keep=0.25"}
    # the choice, recomputed here from the records: least FLOPs among plans within 20 points of the full run
    acc = {p: sum(r["correct"] for r in records if r["plan"] == p) / 10 for p in ("", "uniform:where=pre_llm,keep=0.25")}
    flops = {p: sum(r["prefill_flops"] for r in records if r["plan"] == p) for p in acc}
    ok = [p for p in acc if 100 * (acc[""] - acc[p]) <= 20]
    expected = min(ok, key=lambda p: flops[p])
    doc = yaml.safe_load(open(out / "tuned.yaml"))
    assert Plan.parse(doc["stages"]) == Plan.parse(expected or None)
    assert (out / "front.png").stat().st_size > 10_000 and "(chosen)" in open(out / "front.md").read()
    assert open(out / "command.txt").read().startswith("tokensieve tune --max-accuracy-drop 20")
    # the plan file is a plan every command takes
    assert Plan.parse(str(out / "tuned.yaml")) == Plan.parse(expected or None)
    # again with an unreachable target: the sweep resumes (nothing reruns) and the best reachable is named
    again = cmd[:4] + ["--flops-ratio", "0.001"] + cmd[6:]
    proc = subprocess.run(again, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "resuming: 20 of 20 done" in proc.stderr
    assert "no calibrated plan has prefill FLOPs of at most 0.001" in proc.stderr and "cheapest is" in proc.stderr
    assert len(open(out / "calibration" / "samples.jsonl").readlines()) == 20


def test_the_cli_lists_tune():
    proc = subprocess.run([sys.executable, "-m", "tokensieve", "--help"], capture_output=True, text=True, timeout=120)
    assert "tune" in proc.stdout and os.path.exists(tune.__file__)

"""``tokensieve eval``: outputs, resume after a killed run, refused configurations, bad samples."""
import json
import os
import subprocess
import sys

import pytest

from conftest import kill_after_lines
from tokensieve.eval.videoqa import command as videoqa

pytest.importorskip("av")


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    from tokensieve.eval.shapeworld import dataset

    out = tmp_path_factory.mktemp("world")
    return dataset.write_dataset(str(out), n_images=0, n_videos=3, seed=20_000, size=64, progress=False)


def _lines(out):
    return [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "tokensieve", "eval", "--data", data, "--out", str(out), "--plan", "uniform:keep=0.25",
            "--batch-size", "2", *extra]


def test_outputs_and_summary(world_data, tmp_path):
    out = tmp_path / "run"
    assert videoqa.main(["--data", world_data, "--out", str(out), "--plan", "uniform:keep=0.25", "--batch-size", "4"]) == 0
    n = sum(1 for _ in open(world_data))
    recs = _lines(out)
    assert len(recs) == 2 * n and {r["plan"] for r in recs} == {"", "uniform:where=pre_llm,keep=0.25"}
    assert set(recs[0]) == set(videoqa.RECORD_FIELDS)
    full = [r for r in recs if r["plan"] == ""]
    assert all(r["error"] is None and r["frames"] == 8 and r["kept_tokens"] == r["visual_tokens"] for r in full)
    pruned = [r for r in recs if r["plan"]]
    assert all(r["kept_tokens"] == round(0.25 * r["visual_tokens"]) for r in pruned)
    acc = sum(r["correct"] for r in full) / len(full)
    md = open(out / "summary.md").read()
    assert f"{100 * acc:.1f} ±" in md and "retention" in md
    assert (out / "summary.csv").exists() and (out / "accuracy.png").exists() and (out / "accuracy_prefill.png").exists()
    assert json.load(open(out / "config.json"))["plans"] == ["", "uniform:where=pre_llm,keep=0.25"]


def test_resume_after_a_killed_run_loses_nothing_written(world_data, tmp_path):
    out = tmp_path / "run"
    path = out / "samples.jsonl"
    assert kill_after_lines(_cmd(world_data, out, "--batch-size", "1"), path, 3) >= 3
    with open(path, "a") as f:  # a line torn by a kill mid-write
        f.write('{"id": "vid0-0", "plan": "", "predic')
    again = subprocess.run(_cmd(world_data, out), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    recs = _lines(out)
    n = sum(1 for _ in open(world_data))
    pairs = [(r["id"], r["plan"]) for r in recs]
    assert len(pairs) == len(set(pairs)) == 2 * n  # every (sample, plan) once: none lost, none run twice
    third = subprocess.run(_cmd(world_data, out), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and len(_lines(out)) == 2 * n  # nothing left to run


def test_another_configuration_is_refused_unless_forced(world_data, tmp_path):
    out = tmp_path / "run"
    assert videoqa.main(["--data", world_data, "--out", str(out), "--limit", "2"]) == 0
    assert videoqa.main(["--data", world_data, "--out", str(out), "--limit", "2", "--nframes", "4"]) == 2
    assert videoqa.main(["--data", world_data, "--out", str(out), "--limit", "2", "--nframes", "4", "--force"]) == 0
    assert all(r["frames"] == 4 for r in _lines(out))


def test_bad_samples_are_recorded_and_the_run_goes_on(world_data, tmp_path):
    rows = [json.loads(line) for line in open(world_data)][:2]
    folder = os.path.dirname(world_data)
    bad = tmp_path / "bad.jsonl"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with open(bad, "w") as f:
        for r in rows:
            f.write(json.dumps(dict(r, video=os.path.join(folder, r["video"]))) + "\n")
        f.write(json.dumps(dict(rows[0])) + "\n")  # a duplicate id
        f.write(json.dumps(dict(rows[1], id="missing", video="nowhere.mp4")) + "\n")
        f.write(json.dumps(dict(rows[1], id="broken", video=str(broken))) + "\n")
        f.write(json.dumps({"id": "noquestion", "video": rows[0]["video"]}) + "\n")
    out = tmp_path / "run"
    assert videoqa.main(["--data", str(bad), "--out", str(out)]) == 0
    recs = _lines(out)
    errors = {r["id"]: r["error"] for r in recs if r["error"]}
    assert "missing" in errors and "broken" in errors and "noquestion" in errors
    assert "broken" in errors["broken"] and "question" in errors["noquestion"]
    good = [r for r in recs if not r["error"]]
    assert {r["id"] for r in good} == {rows[0]["id"], rows[1]["id"]}
    assert "| `(full)` |" in open(out / "summary.md").read()
    failures = next(line for line in open(out / "summary.csv") if line.startswith("(full)")).split(",")[2]
    assert int(failures) == len([r for r in recs if r["error"] and r["plan"] == ""])


def test_unreadable_data_stops_before_any_model_work(tmp_path, capsys):
    assert videoqa.main(["--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "run")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "run" / "samples.jsonl").exists()


def test_grid_expands_to_plans_after_the_full_plan():
    plans = videoqa.expand_plans(["fastv:layer=2,keep=0.5"], "uniform,fastv", "0.25,0.11")
    assert plans == ["", "fastv:where=llm,layer=2,keep=0.5", "uniform:where=pre_llm,keep=0.25",
                     "uniform:where=pre_llm,keep=0.11", "fastv:where=llm,layer=2,keep=0.25",
                     "fastv:where=llm,layer=2,keep=0.11"]


def test_a_plan_the_model_cannot_run_stops_before_anything_is_written(world_data, tmp_path, capsys):
    out = tmp_path / "run"
    bad = "dycoke:keep=0.5;divprune:keep=0.5"  # two stages at one place: refused by the engine's plan check
    assert videoqa.main(["--data", world_data, "--out", str(out), "--plan", bad]) == 2
    assert "stage 1 (divprune" in capsys.readouterr().err
    assert not (out / "samples.jsonl").exists() and not (out / "config.json").exists()
    assert videoqa.main(["--data", world_data, "--out", str(out), "--limit", "1"]) == 0  # the folder is still free


def test_the_ray_executor_without_ray_says_how_to_install(world_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert videoqa.main(["--data", world_data, "--out", str(tmp_path / "run"), "--executor", "ray"]) == 2
    assert "pip install 'tokensieve[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

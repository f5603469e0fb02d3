"""``tokensieve eval`` as a nightly job expects it (issue 43, item 5): Ctrl-C says what was saved and how to
resume (exit 130, no traceback); a resumed run says so; a ``--format`` that does not fit the file stops before
any work; per-sample times are the batch's shared evenly (and older samples.jsonl files still read); token
counts print as integers; parquet data reads, and without pyarrow the error names the extra that brings it."""
import ast
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tokensieve.eval.videoqa import command as videoqa, readers, runner, summary
from tokensieve.eval.videoqa.readers import DataError, Sample, read_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = "uniform:where=pre_llm,keep=0.25"


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    pytest.importorskip("av")
    from tokensieve.eval.shapeworld import dataset

    return dataset.write_dataset(str(tmp_path_factory.mktemp("world")), n_images=0, n_videos=3, seed=20_000, size=64,
                                 progress=False)


def _pairs(out) -> list[tuple]:
    return [(r["id"], r["plan"]) for r in map(json.loads, open(os.path.join(out, "samples.jsonl")))]


def _n(data) -> int:
    return sum(1 for _ in open(data))


def _main_interrupted(argv) -> int:
    """videoqa.main's exit status when a KeyboardInterrupt is raised inside it; one that escapes fails the test
    (it would end the process with a traceback) instead of ending the test session."""
    try:
        return videoqa.main(argv)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped tokensieve eval: a traceback, not one line")


# ---- Ctrl-C and resume --------------------------------------------------------------------------
def test_ctrl_c_prints_one_line_and_the_rerun_resumes(world_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["--data", world_data, "--out", str(out), "--plan", PLAN, "--batch-size", "2"]
    write = runner.RecordWriter.write
    calls = []

    def interrupted_after_one(self, records):  # as if Ctrl-C came while the second chunk ran
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(len(records))
        write(self, records)

    monkeypatch.setattr(runner.RecordWriter, "write", interrupted_after_one)
    assert _main_interrupted(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    saved, total = len(_pairs(out)), 2 * _n(world_data)
    assert saved == sum(calls) and 0 < saved < total
    assert err[-1] == (f"interrupted: {saved} of {total} samples x plans saved in {out / 'samples.jsonl'}; "
                       f"resume with: tokensieve eval {' '.join(argv)}")
    assert not any("Traceback" in line for line in err)
    monkeypatch.setattr(runner.RecordWriter, "write", write)
    assert videoqa.main(argv) == 0
    assert f"resuming: {saved} of {total} done" in capsys.readouterr().err
    pairs = _pairs(out)
    assert len(pairs) == len(set(pairs)) == total


def test_a_resumed_run_says_how_far_it_had_got(world_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", world_data, "--out", str(out), "--plan", PLAN, "--limit", "3"]
    assert videoqa.main(argv) == 0
    assert "resuming" not in capsys.readouterr().err  # a fresh run
    lines = open(out / "samples.jsonl").readlines()
    open(out / "samples.jsonl", "w").writelines(lines[:4])  # as if it had stopped after 4 of the 6
    assert videoqa.main(argv) == 0
    assert f"resuming: 4 of 6 done ({out / 'samples.jsonl'})" in capsys.readouterr().err.splitlines()
    assert sorted(_pairs(out)) == sorted((r["id"], r["plan"]) for r in map(json.loads, lines))


def test_sigint_mid_run_exits_130_without_a_traceback(world_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tokensieve", "eval", "--data", world_data, "--out", str(out), "--batch-size", "1",
           "--plan", PLAN, "--plan", "dycoke:keep=0.25", "--plan", "random:keep=0.25"]
    path = out / "samples.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (path.exists() and path.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    total = 4 * _n(world_data)
    saved = len(_pairs(out))
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1].startswith(f"interrupted: {saved} of {total} samples x plans saved in ")
    assert 2 <= saved < total


def test_a_run_with_nothing_saved_says_nothing_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(videoqa, "world_dataset", interrupted)  # Ctrl-C while the world's videos are written
    assert _main_interrupted(["--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.strip() == ("interrupted before any sample ran; run again with: "
                                               f"tokensieve eval --out {tmp_path / 'run'}")


# ---- a --format that does not fit the file ------------------------------------------------------------
def test_a_format_that_does_not_fit_stops_before_any_model_work(world_data, tmp_path, capsys, monkeypatch):
    import tokensieve

    def no_model(**kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(tokensieve, "load", no_model)
    out = tmp_path / "run"
    assert videoqa.main(["--data", world_data, "--out", str(out), "--format", "videomme"]) == 2
    err = capsys.readouterr().err
    assert f"none of its {_n(world_data)} record(s) parses as --format videomme" in err
    assert "videomme reads question_id, videoID, question, options, answer, task_type" in err
    assert "the first record has id, video, n_frames, question" in err and "look like --format jsonl" in err
    assert not out.exists() or not os.listdir(out)


def test_records_that_parse_are_kept_when_only_their_videos_are_missing(tmp_path):
    path = tmp_path / "d.jsonl"  # every video missing: a video problem, recorded per sample, not a format's
    path.write_text(json.dumps({"id": "a", "video": "nowhere.mp4", "question": "q?", "answer": "x"}) + "\n")
    [s] = read_samples(str(path), "jsonl")
    assert "video not found" in s.error


# ---- times per sample --------------------------------------------------------------------------------
class BatchClock:
    """A stand-in engine: each padded batch of ``batch_size`` takes 0.8 s of prefill and 0.1 s of decode in
    all (its Results carry the batch's times, as the engine's do)."""

    def __init__(self):
        self.batches = []

    def generate_batch(self, reqs, batch_size):
        from types import SimpleNamespace

        out = []
        for i in range(0, len(reqs), batch_size):
            part = reqs[i:i + batch_size]
            self.batches.append(len(part))
            out += [SimpleNamespace(text="A", stats=dict(visual_tokens=1024, kept_tokens=256, prefill_s=0.8, decode_s=0.1,
                                                         prefill_flops=1, kv_cache_bytes=1, batch_size=len(part)))
                    for _ in part]
        return out


def test_per_sample_prefill_is_the_batch_time_shared_evenly():
    samples = [Sample(f"s{i}", "v.mp4", "q", ["A. x", "B. y"], "A") for i in range(5)]
    engine = BatchClock()
    recs = runner.run_plan(engine, samples, {s.id: None for s in samples}, PLAN, runner.RunSettings(batch_size=2))
    assert engine.batches == [2, 2, 1]
    assert sum(r["prefill_s"] for r in recs) == pytest.approx(0.8 * 3)  # the run's prefill time, counted once
    assert sum(r["decode_s"] for r in recs) == pytest.approx(0.1 * 3)
    assert [r["batch_size"] for r in recs] == [2, 2, 2, 2, 1]
    assert [r["batch_prefill_s"] for r in recs] == [0.8] * 5
    assert [r["prefill_s"] for r in recs] == pytest.approx([0.4, 0.4, 0.4, 0.4, 0.8])


def test_older_samples_files_read_with_their_batches_found(world_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", world_data, "--out", str(out), "--plan", PLAN, "--batch-size", "3"]
    assert videoqa.main(argv) == 0
    now = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert all(r["batch_size"] in (1, 2, 3) for r in now) and max(r["batch_size"] for r in now) == 3
    csv_now = open(out / "summary.csv").read()
    with open(out / "samples.jsonl", "w") as f:  # as a run before issue 43 wrote it: each batch's whole time
        for r in now:
            old = {k: v for k, v in r.items() if not k.startswith("batch")}
            f.write(json.dumps(dict(old, prefill_s=r["batch_prefill_s"], decode_s=r["batch_decode_s"])) + "\n")
    capsys.readouterr()
    assert videoqa.main(argv) == 0  # resumes: nothing left to run, the summary again
    assert f"resuming: {len(now)} of {len(now)} done" in capsys.readouterr().err
    assert runner.load_records(str(out / "samples.jsonl")) == now
    assert open(out / "summary.csv").read() == csv_now


# ---- integers ------------------------------------------------------------------------------------------
def test_token_counts_print_as_integers(tmp_path):
    recs = [dict(id=f"s{i}", plan=p, correct=True, type=None, error=None, visual_tokens=1024, kept_tokens=k,
                 prefill_flops=2.5e9, prefill_s=0.1, decode_s=0.01, kv_cache_bytes=3.2e6)
            for i in range(3) for p, k in (("", 1024), (PLAN, 256 + i))]
    md = summary.write(recs, ["", PLAN], str(tmp_path))
    full = next(line for line in md.splitlines() if line.startswith("| `(full)`")).split(" | ")
    pruned = next(line for line in md.splitlines() if line.startswith(f"| `{PLAN}`")).split(" | ")
    assert full[-6:-4] == ["1024", "1024"] and pruned[-6:-4] == ["257", "1024"]
    csv_rows = {row[0]: row for row in csv.reader(open(tmp_path / "summary.csv"))}
    assert csv_rows["(full)"][6:8] == ["1024", "1024"] and csv_rows[PLAN][6:8] == ["257", "1024"]
    assert "e+03" not in md


# ---- parquet ---------------------------------------------------------------------------------------------
VIDEOMME = [{"question_id": f"00{i}-1", "videoID": f"v{i}", "duration": "short", "task_type": "Counting Problem",
             "question": "How many people are in the video?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."],
             "answer": "ABCD"[i]} for i in range(3)]


def test_parquet_reads_as_the_same_records_in_json(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    for r in VIDEOMME:
        (tmp_path / f"{r['videoID']}.mp4").write_bytes(b"")
    pq.write_table(pa.Table.from_pylist(VIDEOMME), tmp_path / "test.parquet")
    (tmp_path / "test.json").write_text(json.dumps(VIDEOMME))
    from_parquet = read_samples(str(tmp_path / "test.parquet"))
    assert [s.error for s in from_parquet] == [None] * 3
    assert from_parquet == read_samples(str(tmp_path / "test.json"))
    assert [s.answer for s in from_parquet] == ["A", "B", "C"]


def _extras() -> dict:
    """setup.py's extras_require, read from its source."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))


def test_without_pyarrow_the_error_names_the_extra_that_brings_it(tmp_path, monkeypatch):
    path = tmp_path / "test.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="reading parquet needs pyarrow") as e:
        read_samples(str(path))
    extra = re.search(r"pip install 'tokensieve\[(\w+)\]'", str(e.value)).group(1)
    assert any(req.startswith("pyarrow") for req in _extras()[extra])
    assert readers.PARQUET in str(e.value)

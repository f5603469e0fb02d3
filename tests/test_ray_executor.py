"""``tokensieve eval --executor ray`` on a local Ray cluster (started once for this module, CPU workers):
the same records and summary as the plain run; a sample that raises and a worker that dies do not stop the
run; a killed driver resumes. The plain run in this process is the reference."""
import json
import os
import subprocess
import sys

import pytest

from conftest import kill_after_lines

ray = pytest.importorskip("ray")
pytest.importorskip("av")

from tokensieve.eval.videoqa import command as videoqa, ray_runner, runner  # noqa: E402
from tokensieve.eval.videoqa.readers import read_samples  # noqa: E402

PLAN = "uniform:keep=0.25"
SAME = ("id", "plan", "prediction", "parsed", "answer", "correct", "type", "visual_tokens", "kept_tokens", "frames",
        "prefill_flops", "kv_cache_bytes", "error")  # everything but the times


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    from tokensieve.eval.shapeworld import dataset

    return dataset.write_dataset(str(tmp_path_factory.mktemp("world")), n_images=0, n_videos=4, seed=20_000, size=64,
                                 progress=False)


def _records(out):
    return {(r["id"], r["plan"]): r for r in map(json.loads, open(os.path.join(out, "samples.jsonl")))}


def _table(out):
    """summary.md's rows without the time columns (prefill s, decode s)."""
    rows = [line.split("|") for line in open(os.path.join(out, "summary.md")) if line.startswith("| `")]
    return [r[:-4] + r[-2:] for r in rows]


def test_same_records_and_summary_as_the_plain_run(cluster, world_data, tmp_path):
    args = ["--data", world_data, "--plan", PLAN, "--batch-size", "2"]
    assert videoqa.main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert videoqa.main(args + ["--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2"]) == 0
    plain, distributed = _records(tmp_path / "plain"), _records(tmp_path / "ray")
    assert plain.keys() == distributed.keys() and len(plain) == 2 * sum(1 for _ in open(world_data))
    for key, rec in plain.items():
        assert {k: distributed[key][k] for k in SAME} == {k: rec[k] for k in SAME}
    for rec in distributed.values():  # the same fields, times shared evenly within each batch as in the plain run
        assert set(rec) == set(runner.RECORD_FIELDS) and 1 <= rec["batch_size"] <= 2
        assert rec["prefill_s"] == rec["batch_prefill_s"] / rec["batch_size"]
    assert _table(tmp_path / "plain") == _table(tmp_path / "ray")
    assert "0 sample(s) retried" in open(tmp_path / "ray" / "summary.md").read()


class DiesOnce(ray_runner.EngineWorker):
    """A worker whose process dies the first time it is handed one chosen sample."""

    def __init__(self, *args, victim: str = "", marker: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.victim, self.marker = victim, marker

    def run(self, samples, batch):
        if self.victim in [s.id for s in samples] and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().run(samples, batch)


def test_a_sample_that_raises_and_a_worker_that_dies_do_not_stop_the_run(cluster, world_data, tmp_path):
    rows = [json.loads(line) for line in open(world_data)]
    folder = os.path.dirname(world_data)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for r in rows[:6]:
            f.write(json.dumps(dict(r, video=os.path.join(folder, r["video"]))) + "\n")
        f.write(json.dumps(dict(rows[0], id="broken", video=str(broken))) + "\n")
    samples = read_samples(str(data))
    victim = samples[3].id
    plans = ["", "uniform:where=pre_llm,keep=0.25"]
    settings = runner.RunSettings(batch_size=2, max_new_tokens=16)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    marker = str(tmp_path / "died")
    out = tmp_path / "samples.jsonl"
    with runner.RecordWriter(str(out), plans, 2 * len(samples)) as writer:
        stats = ray_runner.evaluate(samples, plans, set(), settings, writer, {"model": None}, workers=1,
                                    worker_cls=_constructor(DiesOnce, victim, marker))
    assert os.path.exists(marker)  # the worker did die once
    recs = [json.loads(line) for line in open(out)]
    pairs = [(r["id"], r["plan"]) for r in recs]
    assert sorted(pairs) == sorted((s.id, p) for s in samples for p in plans)  # nothing dropped, nothing twice
    assert all("broken" in r["error"] for r in recs if r["id"] == "broken")
    assert all(r["error"] is None for r in recs if r["id"] != "broken")
    assert stats["retried"] >= 1


def _constructor(cls, victim, marker):
    """``cls`` with the fault's settings bound (Ray Data builds the actor from fn_constructor_kwargs)."""
    return type(cls.__name__, (cls,), {"__init__": lambda self, *a, **k: cls.__init__(self, *a, victim=victim,
                                                                                      marker=marker, **k)})


def test_a_killed_driver_resumes_without_losing_or_repeating(cluster, world_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tokensieve", "eval", "--data", world_data, "--out", str(out), "--plan", PLAN,
           "--batch-size", "1", "--executor", "ray", "--workers", "1", "--ray-address", cluster]
    path = out / "samples.jsonl"
    written = kill_after_lines(cmd, path, 2)
    n = sum(1 for _ in open(world_data))
    assert 2 <= written < 2 * n  # killed part-way
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    pairs = list(_records(out))
    lines = open(path).read().count("\n")
    assert lines == len(pairs) == 2 * n  # every (sample, plan) once

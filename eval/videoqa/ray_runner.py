"""``tokensieve eval --executor ray``: the same evaluation on Ray Data, across processes, GPUs and machines.

    tokensieve eval --data videomme.parquet --video-root videos/ --model llava-hf/llava-onevision-qwen2-7b-ov-hf \\
        --device cuda --dtype bfloat16 --plan "dycoke:keep=0.25" --out runs/vmme \\
        --executor ray --workers 8 --gpus-per-worker 1 [--ray-address auto]

Pipeline (Ray Data 2.60): ``from_items`` (one sample per block, so uneven video lengths never leave a worker
idle) -> ``map(decode_row)`` (a CPU stage: the sampled frames decoded, pipelined ahead of the model) ->
``map_batches(EngineWorker, compute=ActorPoolStrategy(size=workers), num_gpus=...)`` (one engine per actor;
every plan still to run on each sample) -> ``iter_batches`` on the driver, which appends each record to
samples.jsonl as it streams back (so resume works as in the plain run: a killed driver loses what was in
flight). A sample that raises is recorded with its error inside the actor; an actor that dies is restarted by
Ray and its rows retried; ``Attempts`` (a named actor) counts the samples started more than once.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from .readers import DataError, Sample
from .runner import RecordWriter, RunSettings, error_text, run_samples

INSTALL = "the Ray executor needs Ray Data: pip install 'tokensieve[ray]' (or pip install 'ray[data]')"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise DataError(INSTALL) from None
    return ray


# ---- the CPU stage --------------------------------------------------------------------------------
def decode_row(row: dict, settings: RunSettings) -> dict:
    """One sample's row -> the row plus its decoded frames ([T, H, W, 3] uint8) and their metadata
    (JSON), or ``failed``: why the video cannot be used."""
    from ...engine.errors import TokenSieveError
    from ...engine.request import DEFAULT_VIDEO_FRAMES
    from ...engine.video import decode_video

    sample = Sample(**json.loads(row["sample"]))
    row = dict(row, frames=np.zeros((0, 1, 1, 3), np.uint8), meta="", failed=sample.error or "")
    if sample.error is None:
        try:
            v = decode_video(settings.video(sample), DEFAULT_VIDEO_FRAMES)
            meta = {f.name: getattr(v, f.name) for f in dataclasses.fields(v) if f.name != "frames"}
            row.update(frames=np.stack([np.asarray(im) for im in v.frames]), meta=json.dumps(meta))
        except TokenSieveError as e:
            row["failed"] = error_text(sample, e)
    return row


def _video(frames: np.ndarray, meta: str):
    from PIL import Image

    from ...engine.video import DecodedVideo

    return DecodedVideo(frames=[Image.fromarray(f) for f in frames], **json.loads(meta))


# ---- the model stage ------------------------------------------------------------------------------
class EngineWorker:
    """A Ray Data actor: one tokensieve engine; a batch of decoded samples in, their records out."""

    def __init__(self, load_kwargs: dict, plans: list[str], settings: RunSettings, attempts=None):
        import tokensieve

        self.engine = tokensieve.load(**load_kwargs)
        self.plans, self.settings, self.attempts = plans, settings, attempts

    def __call__(self, batch: dict) -> dict:
        samples = [Sample(**json.loads(s)) for s in batch["sample"]]
        if self.attempts is not None:  # counted before the work, so a worker that dies in it is seen
            import ray
            ray.get(self.attempts.start.remote([s.id for s in samples]))
        return self.run(samples, batch)

    def run(self, samples: list[Sample], batch: dict) -> dict:
        videos, failed = {}, {}
        for s, frames, meta, why in zip(samples, batch["frames"], batch["meta"], batch["failed"]):
            if why:
                failed[s.id] = why
            else:
                videos[s.id] = _video(frames, meta)
        done = {(s.id, p) for s, todo in zip(samples, batch["plans"]) for p in self.plans if p not in set(todo)}
        records = run_samples(self.engine, samples, videos, failed, self.plans, done, self.settings)
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


class Attempts:
    """How many times each sample was started by a worker (more than once: retried after a worker died)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def start(self, ids: list[str]) -> None:
        for i in ids:
            self.counts[i] = self.counts.get(i, 0) + 1

    def retried(self) -> int:
        return sum(n > 1 for n in self.counts.values())


def check_plans(load_kwargs: dict, plans: list[str]) -> None:
    """Load the model once where a worker would and check every plan against it (PlanError)."""
    import tokensieve

    engine = tokensieve.load(**load_kwargs)
    try:
        for plan in plans:
            engine.check_plan(plan)
    finally:
        engine.close()


# ---- the driver -----------------------------------------------------------------------------------
def connect(address: str | None, workers: int):
    """Connect to a running cluster (``address``), or start a local one sized for ``workers``."""
    ray = import_ray()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(2, workers + 1), log_to_driver=False, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # tokensieve's own bar shows the progress and the running accuracy
    ctx.print_on_execution_start = False
    return ray


def evaluate(samples: list[Sample], plans: list[str], done: set, settings: RunSettings, writer: RecordWriter,
             load_kwargs: dict, workers: int, gpus_per_worker: float = 0, address: str | None = None,
             worker_cls=EngineWorker, on_checked=None) -> dict:
    """Run every (sample, plan) not in ``done`` on Ray; records go to ``writer`` as they stream back.
    ``on_checked`` is called once the plans passed the model's check, before any sample runs.
    Returns {"retried": samples started more than once}."""
    ray = connect(address, workers)
    resources = {"num_cpus": 1, "num_gpus": gpus_per_worker}
    try:
        ray.get(ray.remote(**resources)(check_plans).remote(load_kwargs, plans))
    except ray.exceptions.RayTaskError as e:  # a PlanError (or a model that cannot load): nothing has run
        raise e.cause from None
    if on_checked is not None:
        on_checked()
    attempts = ray.remote(num_cpus=0)(Attempts).remote()
    items = [{"sample": json.dumps(dataclasses.asdict(s)), "plans": [p for p in plans if (s.id, p) not in done]}
             for s in samples]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map(decode_row, fn_kwargs={"settings": settings}, num_cpus=0.5)
    ds = ds.map_batches(worker_cls, fn_constructor_kwargs={"load_kwargs": load_kwargs, "plans": plans,
                                                          "settings": settings, "attempts": attempts},
                        compute=ray.data.ActorPoolStrategy(size=workers), batch_size=settings.batch_size,
                        **resources)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        writer.write([json.loads(r) for r in batch["record"]])
    return {"retried": ray.get(attempts.retried.remote())}


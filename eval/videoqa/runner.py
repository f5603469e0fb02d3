"""Running a video-QA evaluation: samples x plans -> records, written as they come.

Shared by both executors of ``tokensieve eval``: the plain loop here (``evaluate``: videos decoded ahead in
a thread pool while the model runs) and the Ray Data pipeline (``ray_runner``). A record is one line of
``samples.jsonl`` (RECORD_FIELDS); ``RecordWriter`` appends and flushes them and shows the progress.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from . import summary
from .answers import score
from .readers import Sample

RECORD_FIELDS = ("id", "plan", "prediction", "parsed", "answer", "correct", "type", "visual_tokens", "kept_tokens",
                 "frames", "prefill_s", "decode_s", "batch_size", "batch_prefill_s", "batch_decode_s", "prefill_flops",
                 "kv_cache_bytes", "budgets", "error")
# prefill_s / decode_s: the sample's even share of its padded batch's times (batch_prefill_s / batch_size);
# a batch runs as one forward pass, so a sample's own time cannot be split out of it
# budgets: with a keep=auto stage, the budget each of its stages gave the sample and why (engine/budget.py)


@dataclass(frozen=True)
class RunSettings:
    """How each sample runs (picklable: Ray workers get it too)."""

    batch_size: int = 8
    max_new_tokens: int = 16
    nframes: int | None = None
    fps: float | None = None

    def video(self, sample: Sample) -> dict:
        """The ``video=`` of a sample: its path and the sampling options (qwen-vl-utils rules)."""
        return {"path": sample.video, **({"nframes": self.nframes} if self.nframes else {}),
                **({"fps": self.fps} if self.fps else {})}


def record(sample: Sample, plan: str, result=None, error: str | None = None) -> dict:
    """One line of samples.jsonl for a sample under a plan (a Result, or the error that stopped it)."""
    rec = dict.fromkeys(RECORD_FIELDS)
    rec.update(id=sample.id, plan=plan, answer=sample.answer, type=sample.type, correct=False, error=error)
    if result is not None:
        parsed, correct = score(sample, result.text)
        st = result.stats
        rec.update(prediction=result.text, parsed=parsed, correct=correct, visual_tokens=st["visual_tokens"],
                   kept_tokens=st["kept_tokens"], frames=st.get("frames"), prefill_flops=st["prefill_flops"],
                   kv_cache_bytes=st["kv_cache_bytes"], budgets=st.get("budgets"),
                   **shared_times(st["prefill_s"], st["decode_s"], st["batch_size"]))
    return rec


def shared_times(batch_prefill_s: float, batch_decode_s: float, batch_size: int) -> dict:
    """A record's time fields: its padded batch's prefill and decode seconds, the batch's size, and the
    sample's even share of each (the batch's time / its size)."""
    return dict(prefill_s=batch_prefill_s / batch_size, decode_s=batch_decode_s / batch_size, batch_size=batch_size,
                batch_prefill_s=batch_prefill_s, batch_decode_s=batch_decode_s)


def with_shared_times(records: list[dict]) -> list[dict]:
    """Records written before ``batch_size`` was recorded, given the fields: their ``prefill_s`` and
    ``decode_s`` were the whole batch's. The records of one batch are consecutive lines with the same plan
    and the same two times (perf_counter differences: two batches never share both), so each run of
    such lines is one batch. Records that carry ``batch_size`` (or an error) are kept as they are."""
    out, run = [], []

    def flush():
        out.extend(dict(r, **shared_times(r["prefill_s"], r["decode_s"], len(run))) for r in run)
        run.clear()

    for r in records:
        old = "batch_size" not in r and r.get("prefill_s") is not None
        if run and not (old and (r["plan"], r["prefill_s"], r["decode_s"]) ==
                        (run[0]["plan"], run[0]["prefill_s"], run[0]["decode_s"])):
            flush()
        if old:
            run.append(r)
        else:
            out.append(dict({"batch_size": None, "batch_prefill_s": None, "batch_decode_s": None}, **r))
    flush()
    return out


def error_text(sample: Sample, e: BaseException) -> str:
    """"sample ID: message" (a TokenSieveError's message, else the exception's type and message)."""
    from ...engine.errors import TokenSieveError

    msg = str(e) if isinstance(e, TokenSieveError) else f"{type(e).__name__}: {e}"
    return msg if msg.startswith(f"sample {sample.id}") else f"sample {sample.id}: {msg}"


def run_plan(engine, samples: list[Sample], videos: dict, plan: str, settings: RunSettings) -> list[dict]:
    """Records of samples (each with its decoded video in ``videos``) under one plan: one padded-batch
    call, or one sample at a time when it fails, so one bad sample never takes its batch down; a sample
    that raises is recorded with its error."""
    reqs = [{"prompt": s.prompt, "video": videos[s.id], "plan": plan, "max_new_tokens": settings.max_new_tokens}
            for s in samples]
    try:
        results = engine.generate_batch(reqs, batch_size=settings.batch_size) if reqs else []
        return [record(s, plan, r) for s, r in zip(samples, results)]
    except Exception:  # noqa: BLE001 - find the sample that raised, below
        out = []
        for s, req in zip(samples, reqs):
            try:
                out.append(record(s, plan, engine.generate_batch([req])[0]))
            except Exception as e:  # noqa: BLE001 - recorded, counted as a failure, the run goes on
                out.append(record(s, plan, error=error_text(s, e)))
        return out


def run_samples(engine, samples: list[Sample], videos: dict, failed: dict, plans: list[str], done: set,
                settings: RunSettings) -> list[dict]:
    """Records of every (sample, plan) not in ``done``; ``failed``: id -> why the sample cannot run."""
    out = []
    for plan in plans:
        mine = [s for s in samples if (s.id, plan) not in done]
        out += run_plan(engine, [s for s in mine if s.id not in failed], videos, plan, settings)
        out += [record(s, plan, error=failed[s.id]) for s in mine if s.id in failed]
    return out


class RecordWriter:
    """Appends records to samples.jsonl, flushed after each call, with a progress bar (ETA, running
    accuracy per plan)."""

    def __init__(self, path: str, plans: list[str], total: int):
        from tqdm import tqdm

        self._path, self._file = path, None  # opened at the first write: nothing is created before then
        self._running = {p: [0, 0] for p in plans}  # right, seen
        self._bar = tqdm(total=total, desc="samples x plans", unit="run", dynamic_ncols=True, mininterval=1)

    def write(self, records: list[dict]) -> None:
        if self._file is None:
            self._file = open(self._path, "a")
        for rec in records:
            self._file.write(json.dumps(rec) + "\n")
            right_seen = self._running.setdefault(rec["plan"], [0, 0])
            right_seen[0] += bool(rec["correct"])
            right_seen[1] += 1
        self._file.flush()
        self._bar.update(len(records))
        self._bar.set_postfix_str(" ".join(f"{summary.short(p)}={r / max(n, 1):.0%}"
                                           for p, (r, n) in self._running.items()))

    def close(self) -> None:
        self._bar.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def todo(samples: list[Sample], plans: list[str], done: set) -> tuple[list[Sample], int]:
    """The samples with a plan still to run, and the number of (sample, plan) runs left."""
    left = [s for s in samples if any((s.id, p) not in done for p in plans)]
    return left, sum((s.id, p) not in done for s in left for p in plans)


def evaluate(engine, samples: list[Sample], plans: list[str], done: set, settings: RunSettings,
             writer: RecordWriter) -> None:
    """The plain executor: chunks of 2 x batch_size samples, the next chunk's videos decoded in a thread
    pool while this one runs; every plan of a chunk runs on its videos, decoded once."""
    from ...engine.errors import TokenSieveError
    from ...engine.request import DEFAULT_VIDEO_FRAMES
    from ...engine.video import VideoPrefetcher

    size = 2 * settings.batch_size
    chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
    with VideoPrefetcher() as pool:
        def submit(k):
            for s in chunks[k] if k < len(chunks) else []:
                if s.error is None:
                    pool.submit(s.id, settings.video(s), DEFAULT_VIDEO_FRAMES)
        submit(0)
        for k, part in enumerate(chunks):
            submit(k + 1)
            videos, failed = {}, {s.id: s.error for s in part if s.error is not None}
            for s in part:
                try:
                    if s.id not in failed:
                        videos[s.id] = pool.result(s.id)
                except TokenSieveError as e:
                    failed[s.id] = error_text(s, e)
            writer.write(run_samples(engine, part, videos, failed, plans, done, settings))


def load_records(path: str) -> list[dict]:
    """The complete lines of ``samples.jsonl`` (older lines given the batch fields: ``with_shared_times``);
    a torn last line (a kill mid-write) is cut off the file."""
    if not os.path.exists(path):
        return []
    records, good = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                break
            if not line.endswith(b"\n"):
                records.pop()
                break
            good += len(line)
    if good != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good)
    return with_shared_times(records)

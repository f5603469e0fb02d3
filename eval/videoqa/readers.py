"""Video-QA datasets read from local files into one ``Sample`` each; prompts built as lmms-eval builds them.

Formats (``--format``; ``auto`` looks at the file's first record):

| format | file | fields (one record) | video file | prompt (lmms-eval 0.7.3 task) |
|---|---|---|---|---|
| jsonl | .jsonl / .json | id, video, question, options ["A. x", ...], answer (letter, or the open answer), type | video | question, then the options and the letter asked for unless the question already lists them |
| videomme | .json / .jsonl / .parquet | question_id, videoID, question, options ["A. x", ...], answer letter, task_type, duration | {videoID}.mp4 (.MP4, .mkv; also under data/) | videomme |
| mvbench | one .json per task (the task is the file's name) | video, question, candidates [text], answer text | video | mvbench |
| nextqa | .csv / .json / .parquet (MC) | video, qid, question, a0..a4, answer index, type | {video}.mp4 | nextqa_mc_test |
| mlvu | .json (dev) | video_name (or video), question (options inside, or candidates), answer (letter or text), question_type / task_type | video_name | mlvu_dev |
| egoschema | .json / .jsonl / .csv | q_uid, video_idx, question, option 0..4 (or option [..]), answer index | {video_idx}.mp4 | egoschema_subset |

Video files are looked up as given, then under ``video_root`` (default: the data file's folder), then by
file name anywhere below it (one walk). A record that cannot run (a missing field, a video not found, an
answer not among the options, a duplicate id) becomes a Sample with ``error`` set, so the run records it
and goes on; a file that cannot be read at all, or that no record of parses under the format (a ``--format``
that does not fit the file), raises DataError before any work. Parquet files need pyarrow (the ``eval`` extra).
"""
from __future__ import annotations

import csv
import json
import os
import string
from dataclasses import dataclass, field

from ...engine.errors import TokenSieveError

FORMATS = ("jsonl", "videomme", "mvbench", "nextqa", "mlvu", "egoschema")
FIELDS = {  # the fields each format reads (the table above), for the error when a file does not fit one
    "jsonl": "id, video, question, options, answer, type",
    "videomme": "question_id, videoID, question, options, answer, task_type",
    "mvbench": "video, question, candidates, answer",
    "nextqa": "video, qid, question, a0..a4, answer, type",
    "mlvu": "video_name (or video), question, candidates (or options in the question), answer, question_type",
    "egoschema": "q_uid, video_idx, question, option (or option 0..option 4), answer",
}
PARQUET = "reading parquet needs pyarrow: pip install 'tokensieve[eval]' (or pip install pyarrow)"
LETTERS = string.ascii_uppercase
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")
LETTER_POST = "\nAnswer with the option's letter from the given choices directly."  # lmms-eval's default
VIDEOMME_PRE = ("Select the best answer to the following multiple-choice question based on the video and the "
                "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")


class DataError(TokenSieveError):
    """A data file (or an option of the evaluation) that cannot be used."""


@dataclass
class Sample:
    """One question about one video. options: ["A. text", ...] ([] for an open question); answer: the
    correct letter for multiple choice, else the open answer; prompt: what the model is asked;
    error: why the sample cannot run (None when it can)."""

    id: str
    video: str | None
    question: str
    options: list[str] = field(default_factory=list)
    answer: str | None = None
    type: str | None = None
    prompt: str = ""
    error: str | None = None


# ---- reading files ----------------------------------------------------------------------------------
def load_records(path: str) -> list[dict]:
    """The records of a .jsonl / .json / .csv / .parquet file. Raises DataError when it cannot be read."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: {PARQUET}") from None
            return pq.read_table(path).to_pylist()
        with open(path, encoding="utf-8", newline="") as f:
            if suffix == ".csv":
                return list(csv.DictReader(f))
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    except Exception as e:  # pyarrow's own errors
        raise DataError(f"{path}: cannot read it as parquet ({type(e).__name__}: {e})") from None
    return _parse_json(path, text, suffix)


def _parse_json(path: str, text: str, suffix: str) -> list[dict]:
    if suffix != ".jsonl":
        try:
            data = json.loads(text)
        except ValueError:
            if suffix == ".json":
                return _parse_json(path, text, ".jsonl")  # JSON lines under a .json name
            data = None
        if isinstance(data, dict):  # {"id": record} or {"data": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [dict(v, id=v.get("id", k)) if isinstance(v, dict) else v
                                                     for k, v in data.items()]
        if isinstance(data, list):
            return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            raise DataError(f"{path}, line {n}: not JSON ({e.msg})") from None
    if not records:
        raise DataError(f"{path}: no records")
    return records


def detect_format(record: dict) -> str:
    """The format a record's fields say (see the module docstring)."""
    keys = set(record) if isinstance(record, dict) else set()
    if "videoID" in keys:
        return "videomme"
    if "a0" in keys:
        return "nextqa"
    if "video_idx" in keys:
        return "egoschema"
    if "video_name" in keys or "question_type" in keys or ("task_type" in keys and "candidates" not in keys):
        return "mlvu"
    if "candidates" in keys:
        return "mvbench"
    if {"video", "question"} <= keys:
        return "jsonl"
    raise DataError(f"cannot tell the format from the fields {sorted(keys)}; give --format ({', '.join(FORMATS)})")


# ---- options and answers ----------------------------------------------------------------------------
def lettered(options: list[str]) -> list[str]:
    """["x", "y"] -> ["A. x", "B. y"]; options that already start with their letter are kept."""
    out = []
    for i, o in enumerate(options):
        o = str(o).strip()
        out.append(o if option_text(o, LETTERS[i]) != o else f"{LETTERS[i]}. {o}")
    return out


def option_text(option: str, letter: str) -> str:
    """The text of an option written "A. x", "A) x", "(A) x" or "A: x" ("x"); the option itself otherwise."""
    for head in (f"{letter}.", f"{letter})", f"({letter})", f"{letter}:"):
        if option.startswith(head):
            return option[len(head):].strip()
    return option


def answer_letter(answer, options: list[str]) -> str:
    """The correct letter from an answer given as a letter, an index or an option's text. Raises DataError."""
    texts = [option_text(o, LETTERS[i]) for i, o in enumerate(options)]
    a = str(answer).strip() if answer is not None else ""
    if a in LETTERS[:len(options)] and a:
        return a
    if a.isdigit() and int(a) < len(options):
        return LETTERS[int(a)]
    matches = [i for i, t in enumerate(texts) if t.strip().lower() == a.lower() or options[i].strip() == a]
    if len(matches) == 1:
        return LETTERS[matches[0]]
    raise DataError(f"answer {answer!r} is not among the options {options}")


def _listed(question: str, options: list[str]) -> bool:
    """The question already lists every option's text (as the world's questions do)."""
    q = question.lower()
    return all(option_text(o, LETTERS[i]).lower() in q for i, o in enumerate(options))


# ---- one builder per format: record -> (id, video, question, options, answer, type, prompt) --------------
def _jsonl(r: dict, n: int, _: str):
    options = lettered(r.get("options") or [])
    q = _need(r, "question")
    prompt = q if not options or _listed(q, options) else q + "\n" + "\n".join(options) + LETTER_POST
    return r.get("id", n), _need(r, "video"), q, options, _need(r, "answer"), r.get("type"), prompt


def _videomme(r: dict, n: int, _: str):
    options, q = lettered(_need(r, "options")), _need(r, "question")
    prompt = VIDEOMME_PRE + "\n" + q + "\n" + "\n".join(options) + "\n" + LETTER_POST
    return (r.get("question_id", n), str(_need(r, "videoID")), q, options, _need(r, "answer"),
            r.get("task_type") or r.get("duration"), prompt)


def _mvbench(r: dict, n: int, path: str):
    cands, q = [str(c) for c in _need(r, "candidates")], _need(r, "question")
    task = r.get("task") or os.path.splitext(os.path.basename(path))[0]
    prompt = "Question:" + q + "\nOption:\n" + "".join(f"({LETTERS[i]}) {c}\n" for i, c in enumerate(cands)) \
        + "Only give the best option.\n"
    return r.get("id", f"{task}-{n}"), _need(r, "video"), q, lettered(cands), _need(r, "answer"), task, prompt


def _nextqa(r: dict, n: int, _: str):
    q = str(_need(r, "question")).strip()
    options = [f"{LETTERS[i]}. {str(_need(r, f'a{i}')).strip()}" for i in range(5)]
    vid = str(_need(r, "video"))
    rid = f"{vid}-{r['qid']}" if r.get("qid") not in (None, "") else n
    return rid, vid, q, options, _need(r, "answer"), r.get("type"), "\n".join([q, *options])


def _mlvu(r: dict, n: int, _: str):
    q = _need(r, "question")
    options = lettered(r.get("candidates") or [])
    if options and not _listed(q, options):
        q = q + "\n" + "\n".join(f"({LETTERS[i]}) {option_text(o, LETTERS[i])}" for i, o in enumerate(options))
    if not options:  # the options are inside the question: "(A) x" lines
        options = [line.strip() for line in q.splitlines() if line.strip()[:3] in {f"({c})" for c in LETTERS}]
    video = r.get("video_name") or _need(r, "video")
    return (r.get("id", n), video, q, options, _need(r, "answer"), r.get("question_type") or r.get("task_type"),
            q + "\nOnly give the best option.\nBest option: (")


def _egoschema(r: dict, n: int, _: str):
    q = _need(r, "question")
    given = r.get("option")  # lmms-eval's layout: listed as given; the official "option 0".."option 4": lettered
    listed = [str(o) for o in given] if given else lettered([r[f"option {i}"] for i in range(5)
                                                            if r.get(f"option {i}") not in (None, "")])
    return (r.get("q_uid") or r.get("id", n), str(_need(r, "video_idx")), q, lettered(listed), _need(r, "answer"),
            r.get("type"), q + "".join("\n" + o for o in listed) + LETTER_POST)


BUILDERS = {"jsonl": _jsonl, "videomme": _videomme, "mvbench": _mvbench, "nextqa": _nextqa, "mlvu": _mlvu,
            "egoschema": _egoschema}


def _need(r: dict, key: str):
    v = r.get(key)
    if v is None or v == "" or v == []:
        raise DataError(f"missing field '{key}'")
    return v


# ---- videos -------------------------------------------------------------------------------------------
class VideoFinder:
    """A video field -> an existing file: as given, under ``root``, with a video suffix added, or by name
    anywhere below ``root`` (the folder is walked once, on the first miss)."""

    def __init__(self, root: str):
        self.root, self._by_name = root, None

    def find(self, video: str) -> str | None:
        video = str(video).removeprefix("file://")
        for base in (video, os.path.join(self.root, video), os.path.join(self.root, "data", video)):
            for cand in (base, *(base + s for s in VIDEO_SUFFIXES)):
                if os.path.isfile(cand):
                    return os.path.abspath(cand)
        if self._by_name is None:
            self._by_name = {}
            for folder, _, files in os.walk(self.root):
                for name in files:
                    self._by_name.setdefault(name, os.path.join(folder, name))
        name = os.path.basename(video)
        for cand in (name, *(name + s for s in VIDEO_SUFFIXES)):
            if cand in self._by_name:
                return os.path.abspath(self._by_name[cand])
        return None


def read_samples(path: str, fmt: str = "auto", video_root: str | None = None, limit: int | None = None) -> list[Sample]:
    """The samples of a data file (every record; bad ones with ``error`` set). Raises DataError when the
    file cannot be read, the format is unknown, or it holds no record."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    if video_root is not None and not os.path.isdir(video_root):
        raise DataError(f"--video-root is not a folder: {video_root}")
    records = load_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    fmt = detect_format(records[0]) if fmt == "auto" else fmt
    finder = VideoFinder(video_root or os.path.dirname(os.path.abspath(path)))
    samples, first_line, parsed = [], {}, 0
    for n, r in enumerate(records[:limit] if limit else records):
        s, ok = _sample(r, n, fmt, path, finder)
        samples.append(s)
        parsed += ok
        if s.id in first_line:
            s.error = f"sample {s.id}: duplicate id (first at record {first_line[s.id]}), not run"
            s.id = f"{s.id}@{n}"
        first_line.setdefault(s.id, n)
    if samples and not parsed:
        raise DataError(misfit(path, fmt, records, samples))
    return samples


def misfit(path: str, fmt: str, records: list, samples: list[Sample]) -> str:
    """Why no record of a file parses under ``fmt``: the fields it reads, the fields the file has, and the
    format those fields suggest."""
    first = records[0] if isinstance(records[0], dict) else {}
    try:
        guess = detect_format(first)
    except DataError:
        guess = None
    hint = f"; its fields look like --format {guess}" if guess and guess != fmt else ""
    return (f"{path}: none of its {len(samples)} record(s) parses as --format {fmt} (e.g. {samples[0].error}); "
            f"{fmt} reads {FIELDS[fmt]}, the first record has {', '.join(map(str, first)) or 'no fields'}{hint}")


def _sample(r, n: int, fmt: str, path: str, finder: VideoFinder) -> tuple[Sample, bool]:
    """A record's Sample, and whether it parsed under ``fmt`` (its fields, options and answer are usable:
    anything short of that is the format's problem or the record's, not its video's)."""
    if not isinstance(r, dict):
        sample = Sample(id=str(n), video=None, question="", error=f"record {n}: not an object ({type(r).__name__})")
        return sample, False
    rid = str(r.get("id", r.get("question_id", r.get("q_uid", n))))
    try:
        rid, video, q, options, answer, typ, prompt = BUILDERS[fmt](r, n, path)
        rid = str(rid)
        if options:
            answer = answer_letter(answer, options)
        elif fmt != "jsonl":
            raise DataError("no options (a multiple-choice benchmark)")
    except DataError as e:
        return Sample(id=rid, video=None, question=str(r.get("question", "")), error=f"sample {rid}: {e}"), False
    found = finder.find(video)
    sample = Sample(rid, found, str(q), options, str(answer), None if typ is None else str(typ), prompt)
    if found is None:
        sample.error = f"sample {rid}: video not found: {video} (looked under {finder.root})"
    return sample, True

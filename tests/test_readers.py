"""Dataset readers: every format on a small file written here; prompts against lmms-eval's own task code
(``doc_to_text`` of each task with the defaults of its YAML); bad records become samples with an error."""
import csv
import json

import pytest

from tokensieve.eval.videoqa.readers import DataError, read_samples

VIDEOMME = {"question_id": "001-1", "videoID": "fFjv93ACGo8", "duration": "short", "domain": "Knowledge",
            "sub_category": "Humanity & History", "task_type": "Counting Problem",
            "question": "How many people are in the video?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."],
            "answer": "C"}
MVBENCH = {"video": "clip_7.mp4", "question": "What is the action performed by the person?",
           "candidates": ["jumping", "sitting down", "waving"], "answer": "sitting down"}
NEXTQA = {"video": "4882821564", "frame_count": "2400", "width": "640", "height": "480",
          "question": "why did the boy pick up the ball", "answer": "2", "qid": "6", "type": "CW",
          "a0": "to throw", "a1": "to eat it", "a2": "to play with it", "a3": "to clean", "a4": "no reason"}
MLVU = {"video_name": "surveil_1.mp4", "duration": 500.0, "question_type": "anomaly_reco",
        "question": "Does this surveillance footage contain any anomalies?\n(A) Stealing\n(B) Fighting\n(C) Normal\n(D) Arrest",
        "answer": "(B) Fighting"}
EGOSCHEMA = {"q_uid": "0074f737", "video_idx": "0074f737", "question": "What is C doing overall?",
             "option": ["A. cooking", "B. cleaning", "C. reading", "D. painting", "E. sewing"], "answer": "1"}
OURS = {"id": "q1", "video": "ours.mp4", "question": "what colour is the circle ?", "options": [], "answer": "red",
        "type": "colour"}


def lmms_prompt(task: str, doc: dict, monkeypatch) -> str:
    """The prompt lmms-eval 0.7.3 builds for a document of this task (its default model kwargs)."""
    pytest.importorskip("lmms_eval")
    import importlib

    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    utils = importlib.import_module(f"lmms_eval.tasks.{task}.utils")
    letter_post = "\nAnswer with the option's letter from the given choices directly."
    return {
        "videomme": lambda: utils.videomme_doc_to_text(doc, {"pre_prompt": "", "post_prompt": letter_post}),
        "mvbench": lambda: utils.mvbench_doc_to_text(doc, {"sub_task": "action_sequence",
                                                           "post_prompt": "Only give the best option.\n"}),
        "nextqa": lambda: utils.nextqa_doc_to_text_mc(doc, None),
        "mlvu": lambda: utils.mlvu_doc_to_text(doc, {"pre_prompt": "",
                                                     "post_prompt": "\nOnly give the best option.\nBest option: ("}),
        "egoschema": lambda: utils.egoschema_doc_to_text(doc, {"pre_prompt": "", "post_prompt": ""}),
    }[task]()


def _write(tmp_path, name, records, videos):
    path = tmp_path / name
    if name.endswith(".csv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    for v in videos:  # the readers only look the files up
        (tmp_path / "videos" / v).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "videos" / v).write_bytes(b"")
    return str(path)


@pytest.mark.parametrize("fmt, name, record, video, sid, options, answer, typ", [
    ("videomme", "videomme.json", VIDEOMME, "data/fFjv93ACGo8.mp4", "001-1",
     ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "C", "Counting Problem"),
    ("mvbench", "action_sequence.json", MVBENCH, "clip_7.mp4", "action_sequence-0",
     ["A. jumping", "B. sitting down", "C. waving"], "B", "action_sequence"),
    ("nextqa", "val.csv", NEXTQA, "1023/4882821564.mp4", "4882821564-6",
     ["A. to throw", "B. to eat it", "C. to play with it", "D. to clean", "E. no reason"], "C", "CW"),
    ("mlvu", "mlvu_dev.jsonl", MLVU, "surveil_1.mp4", "0",
     ["(A) Stealing", "(B) Fighting", "(C) Normal", "(D) Arrest"], "B", "anomaly_reco"),
    ("egoschema", "subset.json", EGOSCHEMA, "0074f737.mp4", "0074f737",
     ["A. cooking", "B. cleaning", "C. reading", "D. painting", "E. sewing"], "B", None),
    ("jsonl", "ours.jsonl", OURS, "ours.mp4", "q1", [], "red", "colour"),
])
def test_each_format_reads_into_one_sample(tmp_path, monkeypatch, fmt, name, record, video, sid, options, answer, typ):
    path = _write(tmp_path, name, [record], [video])
    for given in (fmt, "auto"):
        [s] = read_samples(path, given, video_root=str(tmp_path / "videos"))
        assert s.error is None, s.error
        assert (s.id, s.options, s.answer, s.type) == (sid, options, answer, typ)
        assert s.video == str((tmp_path / "videos" / video).resolve())
        if fmt != "jsonl":
            assert s.prompt == lmms_prompt(fmt, record, monkeypatch)
        else:
            assert s.prompt == record["question"]


def test_our_jsonl_lists_options_unless_the_question_does(tmp_path):
    listed = dict(OURS, id="a", question="what colour is the circle ? A . red B . blue", options=["A. red", "B. blue"],
                  answer="A")
    bare = dict(OURS, id="b", options=["red", "blue"], answer="blue")
    [a, b] = read_samples(_write(tmp_path, "d.jsonl", [listed, bare], ["ours.mp4"]), video_root=str(tmp_path / "videos"))
    assert a.prompt == listed["question"] and a.answer == "A"
    assert b.prompt == ("what colour is the circle ?\nA. red\nB. blue\n"
                        "Answer with the option's letter from the given choices directly.")
    assert b.options == ["A. red", "B. blue"] and b.answer == "B"


def test_egoschema_official_layout_letters_its_options(tmp_path):
    rec = {"q_uid": "u1", "video_idx": "u1", "question": "What?", "answer": 4,
           **{f"option {i}": f"thing {i}" for i in range(5)}}
    [s] = read_samples(_write(tmp_path, "q.json", [rec], ["u1.mp4"]), video_root=str(tmp_path / "videos"))
    assert s.options[4] == "E. thing 4" and s.answer == "E" and "\nA. thing 0\n" in s.prompt


def test_bad_records_become_samples_with_their_error(tmp_path):
    recs = [dict(OURS, id="ok"), dict(OURS, id="ok"), dict(OURS, id="novideo", video="missing.mp4"),
            {"id": "noq", "video": "ours.mp4", "answer": "x"},
            dict(OURS, id="badanswer", options=["A. red", "B. blue"], answer="green")]
    samples = read_samples(_write(tmp_path, "d.jsonl", recs, ["ours.mp4"]), video_root=str(tmp_path / "videos"))
    errors = {s.id: s.error for s in samples}
    assert errors["ok"] is None
    assert "duplicate id" in errors["ok@1"]
    assert "video not found: missing.mp4" in errors["novideo"]
    assert "missing field 'question'" in errors["noq"]
    assert "'green' is not among the options" in errors["badanswer"]
    assert all(e.startswith(f"sample {i.split('@')[0]}") for i, e in errors.items() if e)


@pytest.mark.parametrize("content, name, words", [
    (None, "none.jsonl", "not found"),
    (b'{"id": 1, "video"\n', "d.jsonl", "line 1: not JSON"),
    (b"\xff\xfe\x00garbage", "d.json", "not UTF-8"),
    (b"", "d.jsonl", "no records"),
    (b'{"foo": 1}\n', "d.jsonl", "cannot tell the format"),
])
def test_unreadable_files_stop_before_any_work(tmp_path, content, name, words):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=words):
        read_samples(str(path))


def test_unknown_format_and_bad_root(tmp_path):
    path = _write(tmp_path, "d.jsonl", [OURS], ["ours.mp4"])
    with pytest.raises(DataError, match="unknown format 'tgif'"):
        read_samples(path, "tgif")
    with pytest.raises(DataError, match="--video-root is not a folder"):
        read_samples(path, video_root=str(tmp_path / "nowhere"))

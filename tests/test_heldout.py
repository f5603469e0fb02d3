"""The held-out accuracy command (issue 5's bar) against the engine answering the same questions."""
import random

import pytest

from tokensieve.eval.shapeworld import heldout, shipped, train_tiny, world


def _engine_right(engine, n: int, seed: int, video: bool) -> dict:
    """Right answers per type, through ``tokensieve``'s generate (an independent path: no logits indexing)."""
    right = {}
    for ex in train_tiny.sample_examples(random.Random(seed), n, video):
        qa = ex["qas"][0]
        text = engine.generate(qa.question, images=[world.render(s) for s in ex["scenes"]], max_new_tokens=1).text
        right[qa.type] = right.get(qa.type, 0) + int(text.strip() == qa.answer)
    return right


def test_heldout_counts_match_the_engine_on_the_same_questions():
    import tokensieve
    res = heldout.measure(shipped.path("llava"), n_images=12, n_videos=3)
    with tokensieve.load(shipped.path("llava")) as engine:
        for kind, n, seed in (("image", 12, 10_000), ("video", 3, 20_000)):
            cells = res[kind]
            assert cells["all"]["n"] == n
            assert cells["open"]["n"] + cells.get("multiple-choice", {"n": 0})["n"] == n
            expected = _engine_right(engine, n, seed, kind == "video")
            got = {k: c["right"] for k, c in cells.items() if k not in ("all", "open", "multiple-choice")}
            assert got == {k: expected.get(k, 0) for k in got} and sum(got.values()) == cells["all"]["right"]


def test_heldout_reads_videos_as_the_engine_does_by_default():
    """Qwen2-VL: native video (the engine's default), its counts those of the engine's ``video=``; LLaVA: frames."""
    import tokensieve
    res = heldout.measure(shipped.path("qwen2_vl"), n_images=0, n_videos=4)
    assert list(res) == ["video native"] and list(heldout.measure(shipped.path("llava"), 0, 1)) == ["video"]
    with tokensieve.load(shipped.path("qwen2_vl")) as engine:
        right = {}
        for ex in train_tiny.sample_examples(random.Random(20_000), 4, True):
            qa = ex["qas"][0]
            text = engine.generate(qa.question, video=[world.render(s) for s in ex["scenes"]], max_new_tokens=1).text
            right[qa.type] = right.get(qa.type, 0) + int(text.strip() == qa.answer)
    got = {k: c["right"] for k, c in res["video native"].items() if k not in ("all", "open", "multiple-choice")}
    assert got == {k: right.get(k, 0) for k in got} and sum(right.values()) == res["video native"]["all"]["right"]


def test_heldout_table_states_the_bar():
    res = {"m": {"image": {"all": {"right": 96, "n": 100, "accuracy": 0.96}, "colour": {"right": 9, "n": 10, "accuracy": 0.9}},
                 "video": {"all": {"right": 85, "n": 100, "accuracy": 0.85}}}}
    text = heldout.table(res)
    assert "| m | image | 96.0 ± 2.0 | 95%: met | colour 90 (10) |" in text
    assert "| m | video | 85.0 ± 3.6 | 90%: not met |" in text


@pytest.mark.parametrize("argv, message", [(["--images", "0", "--videos", "0"], "not all 0"),
                                           (["/no/such/dir"], "no checkpoint directory /no/such/dir")])
def test_heldout_bad_input_is_one_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        heldout.main(argv)
    assert message in capsys.readouterr().err


def test_heldout_main_writes_json_and_table(tmp_path):
    out = tmp_path / "r.json"
    heldout.main(["llava", "--images", "4", "--videos", "0", "--out", str(out)])
    import json
    assert json.loads(out.read_text())["results"]["llava"]["image"]["all"]["n"] == 4
    assert "| llava | image |" in (tmp_path / "r.md").read_text()


def test_relevance_question_counts_match_the_engine():
    """QuoTA's per-frame question on single world frames (issue 29, item 6): the held-out tally against the
    engine answering the same frames, and the questions about present and absent objects both asked."""
    import tokensieve
    res = heldout.measure(shipped.path("llava"), n_images=0, n_videos=0, n_relevance=12)["relevance"]
    examples = train_tiny.relevance_examples(random.Random(30_000), 12)
    answers = [ex["qas"][0].answer for ex in examples]
    assert {"yes", "no"} <= set(answers)
    for ex in examples:  # the "yes" ones name an object the frame shows, the "no" ones one it does not
        qa, shown = ex["qas"][0], {o.name for o in ex["scenes"][0].objects}
        assert (qa.question.split()[3] + " " + qa.question.split()[4] in shown) == (qa.answer == "yes")
    with tokensieve.load(shipped.path("llava")) as engine:
        right = sum(engine.generate(ex["qas"][0].question, images=[world.render(ex["scenes"][0])],
                                    max_new_tokens=1).text.strip() == ex["qas"][0].answer for ex in examples)
    assert res["all"] == {"right": right, "n": 12, "accuracy": round(right / 12, 4)}

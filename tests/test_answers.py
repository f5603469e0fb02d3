"""Answer parsing against a table of replies, and against lmms-eval's own extractor where both read a letter."""
import pytest

from tokensieve.eval.videoqa.answers import normalise, parse_choice, score
from tokensieve.eval.videoqa.readers import Sample

OPTIONS = ["A. red", "B. blue", "C. green", "D. two cats"]

TABLE = [
    ("A", "A"), ("(A)", "A"), ("A.", "A"), ("A:", "A"), ("A)", "A"), ("Answer: A", "A"), ("answer: (b)", None),
    ("The answer is A", "A"), ("The answer is (C).", "C"), ("The best answer is: B", "B"), ("Best option: (D)", "D"),
    ("B. blue", "B"), ("(C) green", "C"), ("C) green", "C"), ("I think B", "B"), ("blue", "B"), ("Blue.", "B"),
    ("It is green.", "C"), ("two cats", "D"), ("2 cats", "D"), ("the circle is red", "A"),
    ("red or blue", None), ("none", None), ("", None), ("Eggs", None), ("a", None), ("E", None),
    ("A is wrong, the answer is C", "A"),  # as lmms-eval: a leading letter outranks an answer phrase
]


@pytest.mark.parametrize("reply, letter", TABLE)
def test_parse_choice_table(reply, letter):
    assert parse_choice(reply, OPTIONS) == letter


@pytest.mark.parametrize("reply", ["A", "(B)", "C.", "D:", "B)", "The answer is C", "Answer: D", "(C) green",
                                   "I choose B", "B is correct", "the correct answer is (A)."])
def test_letters_agree_with_lmms_eval(reply):
    pytest.importorskip("lmms_eval")
    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer

    assert parse_choice(reply, OPTIONS) == extract_mcq_answer(reply, choices=list("ABCD"))


def test_score_multiple_choice_and_open():
    mc = Sample("1", None, "q", OPTIONS, "B")
    assert score(mc, "(B)") == ("B", True)
    assert score(mc, "A") == ("A", False)
    assert score(mc, "no idea") == (None, False)
    open_q = Sample("2", None, "how many circles ?", [], "two")
    assert score(open_q, "2") == ("2", True)
    assert score(open_q, "Two.") == ("2", True)
    assert score(open_q, "2 circles") == ("2 circles", True)
    assert score(open_q, "20") == ("20", False)
    assert score(open_q, "") == (None, False)
    assert score(Sample("3", None, "q", [], "the red one"), "Red one!") == ("red 1", True)  # number words as digits


def test_normalise():
    assert normalise("  The  Three, red cats! ") == "3 red cats"

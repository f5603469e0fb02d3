"""Answers read out of a model's text: a choice letter for multiple choice, a normalised phrase otherwise.

``parse_choice`` follows lmms-eval 0.7.3's ``extract_mcq_answer`` (tasks/_task_utils/mcq_extract.py): candidates in
several formats, the highest-priority format wins, within a format the last occurrence. Formats, high to low:
the reply is the letter / starts with it ("A", "A. red", "(A) red") 10; ends with it ("... is A") 9; after an
answer phrase ("Answer: A", "The answer is A") 7; "(A)" 6; "A." 5; "A:" 4; "A)" 3; "A " 2. Two departures,
both to avoid reading a word as a letter: only the options' letters count, and lmms-eval's last resort (the
letter anywhere, even inside a word) is replaced by the option's own text ("red" when an option is "B. red"),
which lmms-eval's MMMU-style parsers also accept. Nothing found: None (scored wrong).
"""
from __future__ import annotations

import re
import string

from .readers import LETTERS, Sample, option_text

PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3, "space": 2}
PHRASES = ("the correct answer is", "the best answer is", "the correct option is", "the best option is",
           "the correct choice is", "the answer is", "answer is", "correct answer is", "best answer is",
           "correct option is", "best option is", "choice is", "my answer is", "my choice is", "i choose",
           "i select", "i pick", "best option:", "answer:", "option:")
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}


def parse_choice(text: str, options: list[str]) -> str | None:
    """The letter a reply chooses among ``options`` (["A. red", ...]), or None."""
    letters = LETTERS[:len(options)]
    t = " " + text.strip().strip(",.!?;:'\"").strip() + " "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter)

    def add(kind: str, pattern: str):
        for ch in letters:
            for m in re.finditer(pattern.format(re.escape(ch)), t):
                found.append((PRIORITY[kind], m.start(), ch))

    add("parentheses", r"\({}\)")
    add("period", r"(?<![A-Za-z]){}\.")
    add("colon", r"(?<![A-Za-z]){}:")
    add("right_paren", r"(?<![A-Za-z(]){}\)")
    add("space", r"(?<![A-Za-z]){} ")
    low = t.lower()
    for phrase in PHRASES:
        i = low.rfind(phrase)
        if i >= 0:
            m = re.match(r"\s*\(?([A-Z])(?![A-Za-z])", t[i + len(phrase):])
            if m and m.group(1) in letters:
                found.append((PRIORITY["phrase"], i, m.group(1)))
    core = t.strip().lstrip("(")
    if core and core[0] in letters and (len(core) == 1 or not core[1].isalpha()):
        found.append((PRIORITY["start"], 0, core[0]))
    core = t.strip().rstrip(")")
    if core and core[-1] in letters and (len(core) == 1 or not core[-2].isalpha()):
        found.append((PRIORITY["end"], len(t), core[-1]))
    if found:
        return max(found)[2]
    reply = normalise(text)
    by_text = [LETTERS[i] for i, o in enumerate(options) if normalise(option_text(o, LETTERS[i])) == reply]
    if not by_text and reply:  # the option's text inside the reply ("it is red"), when only one option's is
        by_text = [LETTERS[i] for i, o in enumerate(options)
                   if re.search(rf"\b{re.escape(normalise(option_text(o, LETTERS[i])))}\b", reply)]
    return by_text[0] if len(by_text) == 1 else None


def normalise(text: str) -> str:
    """Lower case, punctuation and articles dropped, number words as digits, spaces collapsed."""
    words = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation))).split()
    return " ".join(NUMBERS.get(w, w) for w in words if w not in ARTICLES)


def score(sample: Sample, text: str) -> tuple[str | None, bool]:
    """(parsed answer, correct) for a model's reply: the chosen letter for multiple choice; for an open
    question the normalised reply, correct when it equals the normalised answer or starts with it as a
    whole word ("2", "2 circles" for answer "two"; not "20")."""
    if sample.options:
        parsed = parse_choice(text, sample.options)
        return parsed, parsed is not None and parsed == sample.answer
    parsed, answer = normalise(text), normalise(sample.answer or "")
    if not parsed:
        return None, False
    return parsed, bool(answer) and (parsed == answer or parsed.startswith(answer + " "))

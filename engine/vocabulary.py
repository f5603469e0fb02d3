"""The words a checkpoint was trained to read, and the words of a question it was not.

A small model trained on a closed world (the shipped tiny models) answers any question, and its tokenizer
drops words it does not know: "How many shapes are there?" reads as "how many are there ?" and is answered
``0``. A checkpoint that declares its questions' vocabulary in ``trained_words.json`` beside its config
(``{"words": [...]}``, lower-case) lets every Result say which words of the question the model was never
trained on (``Result.unknown_words``); the CLI and the demo show them as "not understood: shapes". A
checkpoint without the file (any real VLM) reports none.
"""
from __future__ import annotations

import json
import os
import re

TRAINED_WORDS = "trained_words.json"
# a typed word: letters, apostrophes and hyphens, not inside a special token such as <image> or <|image_pad|>
WORD = re.compile(r"(?<![\w<|'-])[A-Za-z][A-Za-z'-]*")


def read_trained_words(checkpoint: str | None) -> frozenset[str] | None:
    """The lower-case words a checkpoint declares (``trained_words.json`` in its directory), or None."""
    path = os.path.join(checkpoint, TRAINED_WORDS) if checkpoint and os.path.isdir(checkpoint) else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return frozenset(w.lower() for w in json.load(f)["words"])


def unknown_words(question: str, known: frozenset[str] | None) -> list[str]:
    """The question's words (lower-case, first occurrence order, once each) that are not in ``known``;
    [] when the model declares no vocabulary."""
    if known is None:
        return []
    out: list[str] = []
    for w in WORD.findall(question):
        w = w.lower().strip("'-")
        if w and w not in known and w not in out:
            out.append(w)
    return out

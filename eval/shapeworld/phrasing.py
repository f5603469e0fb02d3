"""Questions as people type them, for the world's word-level tokenizer.

The world asks "what colour is the circle ?"; people type "What color is the circle?". The shipped
tokenizers carry a normaliser (``normalizer``) that, before the word-level split, makes the second
read as the first:

- punctuation is split off the words ("circle?" -> "circle ?"; "A." -> "A ."); "!", a full stop
  after a word and a colon outside the chat template's "USER:" / "ASSISTANT:" are dropped;
- words of the vocabulary are matched regardless of case ("What", "WHAT" -> "what"; the letters
  A-D and the chat-template words stay as they are);
- common variants map to the world's words: color -> colour, gray -> grey, "what is the colour of
  the X" / "what's the colour of the X" / "which colour is the X" / "tell me the colour of the X" ->
  "what colour is the X", "how many X are in the image" -> "how many X are there", "please" and
  "can you tell me" dropped;
- any other word is dropped, so an unknown word cannot derail the answer.

``rephrase`` writes a world question the ways people do (held-out tests and ``heldout --phrasings``).
"""
from __future__ import annotations

import dataclasses
import json
import random
import re

# (regex, replacement) applied in order after punctuation and case; spaces are normalised last
VARIANTS = (
    (r"\bcolor\b", "colour"), (r"\bgray\b", "grey"), (r"\bplease\b", ""),
    (r"\b(?:can|could) you (?:tell me|say)\b", ""), (r"\btell me\b", ""),
    (r"\bwhat's\b", "what is"), (r"\bwhat is the colour of the\b", "what colour is the"),
    (r"\bwhich colour is the\b", "what colour is the"), (r"\bthe colour of the\b", "what colour is the"),
    (r"^\s*colour of the\b", "what colour is the"),
    (r"\bwhat is the shape of the\b", "what shape is the"), (r"\bwhich shape is the\b", "what shape is the"),
    (r"\bare in the (?:image|picture)\b", "are there"), (r"\bdo you see\b", "are there"),
    (r"\bwhere is the\b", "which quadrant is the"),
)
# the typed words VARIANTS rewrite or drop on purpose: understood, though no world question uses them
VARIANT_WORDS = ("color", "of", "please", "can", "could", "you", "tell", "me", "say", "what's", "image", "picture",
                 "do", "see", "where")
PUNCTUATION = ((r"\?", " ? "), (",", " , "), (r"(?<![A-D]|[A-D] )\.", " "), (r"\.", " . "), ("!", " "),
               (r"(?<!USER|ASSISTANT):", " "))  # a dot only after an option letter; ":" only in the template
KEEP_CASE = ("A", "B", "C", "D", "USER:", "ASSISTANT:")  # the option letters, the chat template's words


def known_words(vocab: dict[str, int]) -> list[str]:
    """The plain words of a word-level vocabulary (no special tokens, digits or punctuation)."""
    return sorted(w for w in vocab if re.fullmatch(r"[a-z][a-z-]*", w))


def normalizer(vocab: dict[str, int]):
    """A ``tokenizers`` normaliser that rewrites typed questions into the vocabulary's words (module doc)."""
    from tokenizers import Regex, normalizers

    words = known_words(vocab)
    steps = [normalizers.Replace(Regex(p), r) for p, r in PUNCTUATION]
    for w in words:  # Capitalised and UPPER forms of a known word (never the letters A-D: options)
        for form in sorted({w.capitalize(), w.upper()} - {w, *KEEP_CASE}):
            steps.append(normalizers.Replace(Regex(rf"\b{re.escape(form)}\b(?!:)"), w))
    steps += [normalizers.Replace(Regex(p), r) for p, r in VARIANTS]
    allowed = sorted(set(words) | {"what's"} | {w.rstrip(":") for w in vocab if w.endswith(":")},
                     key=lambda w: (-len(w), w))  # longest first; sorted, so the file is the same under any hash seed
    # any other word: dropped (a word is letters, apostrophes and hyphens; the letters A-D are options)
    steps.append(normalizers.Replace(Regex(rf"(?<![\w<|-])(?!(?:{'|'.join(map(re.escape, allowed))}|[A-D])(?![\w'-]))"
                                           rf"[A-Za-z][A-Za-z'-]*"), ""))
    return normalizers.Sequence(steps)


def install(tokenizer_json: str) -> None:
    """Write ``normalizer`` into a saved word-level ``tokenizer.json`` (the shipped models, new checkpoints)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.normalizer = normalizer(tok.get_vocab())
    data = json.loads(tok.to_str())
    with open(tokenizer_json, "w") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)


# ---- typed questions ------------------------------------------------------------------------------
TYPED = {  # world prefix -> ways people type it ({rest} is the remainder of the question, "?" stripped)
    "what colour is the ": ("What color is the {rest}?", "What is the colour of the {rest}?",
                            "Which colour is the {rest}?", "what's the color of the {rest}", "Colour of the {rest}?"),
    "what shape is the ": ("What shape is the {rest}?", "What is the shape of the {rest}?",
                           "Which shape is the {rest}?"),
    "how many ": ("How many {rest}?", "how many {rest}", "HOW MANY {rest}?"),
    "is there a ": ("Is there a {rest}?", "is there a {rest}", "Is there a {rest} please?"),
}
POLITE = ("", " please", " Please.", "")


def maybe_typed(qa, rng: random.Random, fraction: float):
    """``qa`` (a ``world.QA``) with its question ``rephrase``d with probability ``fraction`` if it is open (a
    multiple-choice question keeps the world's wording); no draw is made for ``fraction`` 0 or an option list."""
    if fraction > 0 and not qa.options and rng.random() < fraction:
        return dataclasses.replace(qa, question=rephrase(qa.question, rng))
    return qa


def rephrase(question: str, rng: random.Random) -> str:
    """A world question ("what colour is the circle ?") as a person might type it ("What color is the circle?")."""
    q = question.removesuffix(" ?")
    for prefix, forms in TYPED.items():
        if q.startswith(prefix):
            typed = rng.choice(forms).format(rest=q[len(prefix):])
            break
    else:
        typed = q[0].upper() + q[1:] + "?"
    typed = typed.replace(" , ", ", ")
    return (typed + rng.choice(POLITE)) if not typed.endswith("please?") else typed

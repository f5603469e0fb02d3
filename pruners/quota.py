"""`quota`: QuoTA (Luo et al., 2025, "QuoTA: Query-oriented Token Assignment via CoT Query
Decouple for Long Video Comprehension"; official code MAC-AutoML/QuoTA).

A frames stage (``where="frames"``). A VLM rates every frame against the question with a
single-frame yes/no prompt; the rating p_t is the probability of the answer "A" (yes) read from the
last-token logits (``tools/qwen2vl_batch.py::frame_retrieve``: softmax over the FULL vocabulary, then
the column of token "A", id 32 in Qwen2-VL's tokenizer; the "B" column is never read). Optionally the
question is first "decoupled": the base VLM answers a 3-step prompt listing the physical objects the
question needs, parsed by regex (``quota_pipeline.py``), and the rating prompt then asks whether the
frame contains any of them. Weights w_t = (100 p_t)^2 (``weight_scale = [100, 2]``), normalised;
frame t gets int(total * w_t) tokens, frames at 0 are dropped, and each frame's feature grid is
resized bilinearly to the largest h x w that fits (``core/llava_arch.py::token_compress``, "v1").
Official setting: total = 196 * 64 tokens over 96 (+64 per hour) frames of LLaVA-Video-7B, rated by
Qwen2-VL-2B-Instruct.

``RelevanceScorer`` is the rating pass (the engine builds one from the stage's options and hands
each request's question and sampled frames to it: ``frame_relevance``); ``QuotaPruner`` only
turns that into budgets (``frame_budget``: allocation, caps and the remainder there). Options:
``within`` (resize | a spatial pruner), ``decouple`` (bool), ``objects`` (the objects to rate
against, given instead of decoupling: a list in a dict plan), ``prompt`` / ``object_prompt`` /
``decouple_prompt`` (templates with ``{question}`` / ``{objects}``), ``scorer`` ("self" or a
checkpoint), ``yes`` / ``no`` (answer words), ``decouple_tokens``, ``scorer_batch``.

Choices: without a ``frame_relevance`` (called outside the engine) every frame weighs the same;
``parse_objects`` uses ``ast.literal_eval`` where the official code calls ``eval``, and falls back
to splitting the bracket's text on commas when it is not a Python list (the official code fails
there); ``yes_probability`` sums the probabilities of every id in ``yes_ids`` (one id: the official
value exactly).
"""
from __future__ import annotations

import ast
import re

import torch

from ..engine.errors import PlanError
from .base import Signals, StageInput
from .frame_budget import WITHIN, FrameBudgetPruner, FrameSignals
from .options import Option

WEIGHT_SCALE = (100.0, 2.0)  # w = (scale * p) ** power  (quota_pipeline.py: weight_scale = [100, 2])

# The rating prompts of quota_pipeline.py::process_video_prune (objects joined by ", ").
OBJECT_RATING_PROMPT = ("Does the image contain any object of {objects}? A. yes, B. no\n"
                        "Answer with the option's letter directly.")
QUESTION_RATING_PROMPT = ("{question}\nDoes the image contain sufficient information to answer the given question? "
                          "A. yes, B. no\nAnswer with the option's letter directly.")

# The query-decoupling prompt of quota_pipeline.py (retrieve_pmt_0 = query + this), as written there.
DECOUPLING_PROMPT = "{question}\n" + "\n".join([
    "To answer this question, please follow the following step to give an object list for object detection.",
    '    Step 1: Do you think it is necessary to detect specific physical entities in the video? Please only answer '
    '"yes" or "no" in this step.',
    "    Step 2: If 'yes' in previous step, then what object in the video do you think needs to be detected to answer "
    "this question? Please only output the name of all the objects need to detect in the form of a Python list "
    "without other information.",
    "    Step 3: Filter the object list provided in step 2, make sure they are physical entities, not abstract "
    "concepts. Please only output the name of the filtered object in the form of a Python list without other "
    "information. If all the words being filtered, please only output null.",
    "    # Example 1:",
    "    Question: How many blue balloons are over the long table in the middle of the room at the end of this video? "
    "A. 1. B. 2. C. 3. D. 4.",
    "    Your output should be:",
    "    Step 1: yes",
    '    Step 2: ["blue ballons", "long table", "video", "blue"]',
    '    Step 3: ["blue ballons", "long table"]',
    "    # Example 2:",
    "    Question: In the lower left corner of the video, what color is the woman wearing on the right side of the man "
    "in black clothes? A. Blue. B. White. C. Red. D. Yellow.",
    "    Your output should be:",
    "    Step 1: yes",
    '    Step 2: ["the man in black", "woman", "lower left corner"]',
    '    Step 3: ["the man in black", "woman"]',
    "    # Example 3:",
    "    Question: In which country is the comedy featured in the video recognized worldwide? A. China. B. UK. "
    "C. Germany. D. United States.",
    "    Your output should be:",
    "    Step 1: no",
])

_STEP1 = re.compile(r"step 1: (yes|no)")
_STEP3 = re.compile(r"step 3: (\[[^\]]*\])")


def rating_prompt(question: str, objects: list[str] | None, template: str | None = None,
                  object_template: str | None = None) -> str:
    """The single-frame rating prompt: about the objects when decoupling found some, else about the question.

    ``template`` replaces QUESTION_RATING_PROMPT (option ``prompt``), ``object_template`` replaces
    OBJECT_RATING_PROMPT (option ``object_prompt``); ``{question}`` and ``{objects}`` are filled in.
    """
    if objects:
        text = object_template or OBJECT_RATING_PROMPT
    else:
        text = template or QUESTION_RATING_PROMPT
    return text.replace("{objects}", ", ".join(objects or [])).replace("{question}", question)


def decoupling_prompt(question: str, template: str | None = None) -> str:
    """The 3-step query-decoupling prompt for ``question`` (``template``: option ``decouple_prompt``)."""
    return (template or DECOUPLING_PROMPT).replace("{question}", question)


def parse_objects(text: str) -> list[str]:
    """The objects of a decoupling answer, as the official code reads them: on the lower-cased text,
    "step 1: yes" must be found, then the list after "step 3:" (regex ``step 3: (\\[[^\\]]*\\])``).
    [] when step 1 is missing or "no", step 3 has no list (e.g. "null"), or nothing in it parses.
    Strings only, stripped, empty ones and repeats dropped, in order.
    """
    low = (text or "").lower()
    step1 = _STEP1.search(low)
    if not step1 or step1.group(1) != "yes":
        return []
    step3 = _STEP3.search(low)
    if not step3:
        return []
    raw = step3.group(1)
    try:
        items = ast.literal_eval(raw)
        if not isinstance(items, (list, tuple)):
            items = []
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        items = [part.strip().strip("'\"") for part in raw[1:-1].split(",")]
    out: list[str] = []
    for it in items:
        if isinstance(it, str) and it.strip() and it.strip() not in out:
            out.append(it.strip())
    return out


def yes_probability(logits: torch.Tensor, yes_ids, no_ids=(), mode: str = "vocab") -> torch.Tensor:
    """logits [T, V] (each frame's last-token logits) -> [T] P(yes).

    mode "vocab" (official): softmax over the whole vocabulary, summed over ``yes_ids`` (``no_ids``
    unused). mode "pair": the same probabilities renormalised over yes + no, P(yes) / (P(yes) + P(no)).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    yes = sorted(set(int(i) for i in yes_ids))
    p_yes = probs[:, yes].sum(-1)
    if mode == "vocab":
        return p_yes
    if mode == "pair":
        no = sorted(set(int(i) for i in no_ids))
        return p_yes / (p_yes + probs[:, no].sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
    raise ValueError(f"yes_probability: mode must be 'vocab' or 'pair', got {mode!r}")


def quota_weights(p: torch.Tensor) -> torch.Tensor:
    """[T] relevance P(yes) -> [T] QuoTA weights (100 p)^2, normalised (all 0: all 0)."""
    w = (p.double() * WEIGHT_SCALE[0]) ** WEIGHT_SCALE[1]
    s = w.sum()
    return w / s if float(s) > 0 else w


def answer_ids(tokenizer, word: str) -> list[int]:
    """Ids of the first token of ``word`` and of `` word`` (a tokenizer may mark a leading space)."""
    ids = {tokenizer.encode(w, add_special_tokens=False)[0] for w in (word, " " + word)
           if tokenizer.encode(w, add_special_tokens=False)}
    return sorted(ids - {tokenizer.unk_token_id})


class RelevanceScorer:
    """QuoTA's rating pass: a VLM rates every sampled frame against the question, P(yes) of its first answer
    token (one batched pass of single-frame prompts), after listing the question's objects (``decouple``).

    ``rater``: an engine (``generate``, ``generate_batch``, ``processor``): the loaded model (``scorer=self``)
    or another checkpoint; ``options``: the stage's options with their defaults filled in.
    """

    def __init__(self, rater, options: dict):
        self.rater, self.options = rater, options
        tok = rater.processor.tokenizer
        self.yes_ids, self.no_ids = answer_ids(tok, options["yes"]), answer_ids(tok, options["no"])

    @classmethod
    def build(cls, options: dict, models) -> "RelevanceScorer":
        """``models.vlm(spec)``: the engine itself for "self", else the checkpoint ``spec`` loaded."""
        return cls(models.vlm(options["scorer"]), options)

    def check(self, label: str) -> None:
        if not self.yes_ids:
            raise PlanError(f"{label}: the rater's tokenizer has no token for the answer {self.options['yes']!r}; "
                            "give yes=/no= words it knows (and a prompt asking for them)")

    def score(self, question: str, frames: list) -> FrameSignals:
        """frames: T sampled frames (PIL) -> frame_relevance [T] = P(yes), and the rater's FLOPs."""
        opt, flops = self.options, 0
        objects = opt["objects"]
        objects = [objects] if isinstance(objects, str) else objects
        if objects is None and opt["decouple"]:
            res = self.rater.generate(decoupling_prompt(question, opt["decouple_prompt"]), plan=[],
                                      max_new_tokens=opt["decouple_tokens"])
            objects = parse_objects(res.text) or None
            flops += res.stats["prefill_flops"]
        prompt = rating_prompt(question, objects, opt["prompt"], opt["object_prompt"])
        rated = self.rater.generate_batch([{"prompt": prompt, "images": [f], "plan": [], "max_new_tokens": 1}
                                           for f in frames], batch_size=opt["scorer_batch"], output_logits=True)
        logits = torch.stack([r.logits[0] for r in rated])  # [T, V]
        flops += sum(r.stats["prefill_flops"] + r.stats["vision_flops"] for r in rated)
        return FrameSignals(per_frame={"frame_relevance": yes_probability(logits, self.yes_ids, self.no_ids)},
                            flops=flops)


class QuotaPruner(FrameBudgetPruner):
    name = "quota"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    signals = Signals("frames.relevance")
    options = {
        "within": WITHIN,
        "scorer": Option("str", "the rating VLM: self (the loaded model) or a checkpoint (QuoTA: a small VLM)", "self"),
        "objects": Option("strs", "the objects the question needs, a/b (skips the decoupling)", None),
        "decouple": Option("bool", "let the rater list the objects first (QuoTA's three-step prompt)", False),
        "prompt": Option("str", "rating prompt with {question} (default: QuoTA's)", None),
        "object_prompt": Option("str", "rating prompt with {objects} (default: QuoTA's)", None),
        "decouple_prompt": Option("str", "decoupling prompt with {question} (default: QuoTA's)", None),
        "yes": Option("str", "the answer word whose probability is the relevance", "A"),
        "no": Option("str", "the other answer word", "B"),
        "decouple_tokens": Option("int", "new tokens of the decoupling answer", 64, low=1),
        "scorer_batch": Option("int", "frames rated per batch", 16, low=1)}

    def frame_weights(self, inp: StageInput, n_frames: int) -> torch.Tensor:
        if inp.frame_relevance is None:
            return torch.ones(n_frames, dtype=torch.float64)
        return quota_weights(inp.frame_relevance.detach().cpu().flatten())

"""`keyscore`: KeyScore (Lin, Paul & Chen, 2025, "From Captions to Keyframes: KeyScore for Multimodal Frame
Scoring and Video-Language Understanding", arXiv 2510.06509; Amazon Prime Video).

A frames stage (``where="frames"``). KeyScore scores each frame by three signals: its semantic similarity to
the caption (CLIP), its temporal representativeness, and its contextual drop impact (how much the video's
match to the caption falls without it). Here the question plays the caption.

No official code: the paper links none, and no repository in the stored material holds it (the GitHub
repositories named "keyscore" are unrelated projects). The formulas below are the paper's method section as
reported by the stored review of arXiv 2510.06509v1 (themoonlight.io; the arXiv HTML's method section
itself could not be read): S_sem(i) = cos(f_i, t); S_temp(i) = cos(f_i, v), v the global video embedding
("mean pooling of all frame embeddings, or text-guided attention"; it down-weights outlier frames);
S_drop(i) = cos(v, t) - cos(v_(-i), t); KeyScore = alpha S_sem + beta S_temp + gamma S_drop,
alpha + beta + gamma = 1, each term min-max normalised first. So, with T frames:

    f_i = frame_embeds[i] / |.|,  q = text_embed / |.|,  v = mean_j f_j,  v_{-i} = mean_{j != i} f_j
    S_sem(i)  = f_i . q
    S_temp(i) = cos(f_i, v)                           (``temporal="video"``, the default: mean pooling)
    S_drop(i) = cos(v, q) - cos(v_{-i}, q)
    each term min-max normalised over the frames (a constant term -> 0), then
    KeyScore(i) = a S_sem + b S_temp + c S_drop,   (a, b, c) = ``weights``, default (1/3, 1/3, 1/3)

Ours, where the paper (as read) is silent or gives a choice: mean pooling of the normalised frame
embeddings (not the text-guided attention) for v; equal weights (the paper's values were not readable);
``temporal="representative"``: the mean cosine to the frames within ``window`` on each side instead of
to v (this module's earlier default), ``temporal="distinct"``: 1 - that (the OpenReview abstract's
"temporal distinctiveness", v1's "temporal diversity"). With one frame S_temp = S_drop = 0.

The paper uses the scores to select keyframes; here they become frame weights for the budgets
(``frame_budget.allocate_budgets``): softmax(KeyScore / ``temperature``), default temperature 0.2
(best-to-worst weight ratio <= e^5); ``keyframes=m`` keeps only the m best frames (the paper's use;
ties: earlier frame), softmax over them. Without ``frame_embeds`` (called outside the engine) every
frame weighs the same.

Options: ``within``, ``clip`` (the open_clip model the engine embeds with), ``weights`` (a/b/c),
``temporal`` (video | representative | distinct), ``window`` (default 2, the windowed terms only),
``temperature``, ``keyframes``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Signals, StageInput
from .frame_budget import WITHIN, FrameBudgetPruner, FrameSignals
from .options import Option

DEFAULT_WEIGHTS = (1 / 3, 1 / 3, 1 / 3)
DEFAULT_WINDOW = 2
DEFAULT_TEMPERATURE = 0.2


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(x)


def keyscore_terms(frame_embeds: torch.Tensor, text_embed: torch.Tensor, window: int = DEFAULT_WINDOW,
                   temporal: str = "video") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """frame_embeds [T, E], text_embed [E] -> raw (S_sem, S_temp, S_drop), each [T] float64 (see module doc)."""
    f = F.normalize(frame_embeds.detach().double().cpu(), dim=-1)
    q = F.normalize(text_embed.detach().double().cpu().flatten(), dim=0)
    n = f.shape[0]
    sem = f @ q
    total = f.sum(0)  # n v: the cosines below are scale-free
    if temporal == "video":
        temp = F.cosine_similarity(f, total[None], dim=-1) if n > 1 else torch.zeros(n, dtype=torch.float64)
    elif temporal in ("representative", "distinct"):
        sim = f @ f.T
        i = torch.arange(n)
        near = ((i[:, None] - i[None, :]).abs() <= int(window)) & (i[:, None] != i[None, :])
        count = near.sum(1)
        temp = torch.where(count > 0, (sim * near).sum(1) / count.clamp_min(1), torch.zeros(n, dtype=torch.float64))
        if temporal == "distinct":
            temp = torch.where(count > 0, 1 - temp, temp)
    else:
        raise ValueError(f"keyscore: temporal must be 'video', 'representative' or 'distinct', got {temporal!r}")
    if n > 1:
        full = F.cosine_similarity(total, q, dim=0)
        without = F.cosine_similarity(total[None] - f, q[None], dim=-1)  # mean vs sum: the cosine is scale-free
        drop = full - without
    else:
        drop = torch.zeros(n, dtype=torch.float64)
    return sem, temp, drop


def keyscore(frame_embeds: torch.Tensor, text_embed: torch.Tensor, weights=DEFAULT_WEIGHTS,
             window: int = DEFAULT_WINDOW, temporal: str = "video") -> torch.Tensor:
    """frame_embeds [T, E], text_embed [E] -> [T] KeyScore = a S_sem + b S_temp + c S_drop, min-max normalised terms."""
    a, b, c = (float(v) for v in weights)
    sem, temp, drop = keyscore_terms(frame_embeds, text_embed, window, temporal)
    return a * _minmax(sem) + b * _minmax(temp) + c * _minmax(drop)


def score_weights(score: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                  keyframes: int | None = None) -> torch.Tensor:
    """[T] KeyScore -> [T] frame weights: softmax(score / temperature), over the ``keyframes`` best only if given."""
    s = score.double()
    if keyframes is not None and 0 < int(keyframes) < s.numel():
        order = sorted(range(s.numel()), key=lambda i: (-float(s[i]), i))[: int(keyframes)]
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[order] = True
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s / float(temperature), dim=0)


class ClipScorer:
    """KeyScore's CLIP pass: open_clip embeddings of every sampled frame and of the question.

    ``model``, ``preprocess``, ``tokenizer``: an open_clip model as ``open_clip.create_model_and_transforms``
    and ``get_tokenizer`` give them (the engine's frame models load the one ``clip=`` names).
    """

    def __init__(self, model, preprocess, tokenizer):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer

    @classmethod
    def build(cls, options: dict, models) -> "ClipScorer":
        """``models.clip(name)``: (model, preprocess, tokenizer) of ``clip=`` (None: the shipped tiny-clip)."""
        return cls(*models.clip(options["clip"]))

    def check(self, label: str) -> None:
        pass

    def score(self, question: str, frames: list) -> FrameSignals:
        """frames: T sampled frames (PIL) -> frame_embeds [T, E], text_embed [E] (float32), and their FLOPs."""
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            embeds = self.model.encode_image(torch.stack([self.preprocess(f) for f in frames]))
            text = self.model.encode_text(self.tokenizer([question]))[0]
        return FrameSignals(per_frame={"frame_embeds": embeds.float()}, per_request={"text_embed": text.float()},
                            flops=int(counter.get_total_flops()))


class KeyScorePruner(FrameBudgetPruner):
    name = "keyscore"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    signals = Signals("frames.clip")
    options = {
        "within": WITHIN,
        "clip": Option("str", "open_clip model name or local-dir:PATH (default: the shipped tiny-clip)", None),
        "weights": Option("floats", "weights of similarity / temporal / drop-impact terms", DEFAULT_WEIGHTS, low=0,
                          length=3),
        "window": Option("int", "frames on each side for temporal=representative|distinct", DEFAULT_WINDOW, low=1),
        "temperature": Option("float", "softmax temperature of the frame weights", DEFAULT_TEMPERATURE, low=1e-6),
        "temporal": Option("str", "temporal term: cosine to the mean video embedding (the paper), mean cosine to "
                           "the frames within window, or 1 - that", "video",
                           choices=("video", "representative", "distinct")),
        "keyframes": Option("int", "give budget to the k best frames only (default: every frame)", None, low=1)}

    def frame_weights(self, inp: StageInput, n_frames: int) -> torch.Tensor:
        if inp.frame_embeds is None or inp.text_embed is None:
            return torch.ones(n_frames, dtype=torch.float64)
        o = inp.options
        score = keyscore(inp.frame_embeds, inp.text_embed, self.option(o, "weights"), self.option(o, "window"),
                         self.option(o, "temporal"))
        return score_weights(score, self.option(o, "temperature"), self.option(o, "keyframes"))

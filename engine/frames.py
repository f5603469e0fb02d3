"""Frames stages: a video's budget shared out over its frames, and the passes that score the frames.

Everything the engine does for a ``where="frames"`` stage is here: building and checking the stage's
scorer, the scoring pass, the selection on the video's tokens, and the video's stats. A pruner acting
there declares the signal it reads (``frames.*``, ``engine/signals.py``); ``SCORERS`` maps it to the
scorer that computes it, an object built from the stage's options (``build(options, models)``), checked before any
work (``check``) and called per request (``score(question, frames)``: ``frame_budget.FrameSignals``):

    "frames.relevance"  ``quota.RelevanceScorer``: a VLM rates every sampled frame against the question
                        (QuoTA), the loaded model (``scorer=self``) or another checkpoint (``scorer=PATH``).
    "frames.clip"       ``keyscore.ClipScorer``: open_clip embeddings of every frame and of the question
                        (KeyScore); ``clip=`` names the model (default: the shipped tiny-clip).

Models other than the engine's own are loaded by the ``frame_models`` handed to the Engine
(``tokensieve.load`` hands ``tokensieve.FrameModels``: checkpoints, shipped names, open_clip names);
an Engine built without one scores with itself only and refuses, before any work, a stage needing more.

A "frame" is a unit of the model's token grid: a sampled frame, or on Qwen2-VL / 2.5-VL a
temporal patch of two sampled frames, which gets the larger score of its two frames.

The pruner sees only the video's tokens (coords item = frame); the request's images pass the
stage untouched. The cost of scoring is reported apart from the answer's prefill
(``scoring_s``, ``scoring_flops``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..pruners import Selection, get_pruner
from ..pruners.keyscore import ClipScorer
from ..pruners.quota import RelevanceScorer
from .errors import InputError, PlanError
from .signals import frame_signal, instruction_embeds

SCORERS = {"frames.relevance": RelevanceScorer, "frames.clip": ClipScorer}  # signal -> its scorer (build, check, score)


@dataclass
class FrameScores:
    """One request's frame signals for a frames stage, and what computing them cost."""

    signals: dict = field(default_factory=dict)  # frame_relevance [T] | frame_embeds [T, E] + text_embed [E]
    seconds: float = 0.0
    flops: int = 0


class FrameScorers:
    """The scorers of one engine's frames stages and the models they use.

    ``owner``: the engine (QuoTA's ``scorer=self``); ``models``: what loads the other models, or None (the
    engine then scores with itself only): ``vlm(spec, device)`` -> an engine, ``clip(name)`` -> (model,
    preprocess, tokenizer), ``close()``; it keeps what it loaded, and is closed with the engine.
    """

    def __init__(self, owner, models=None):
        self.owner, self.models = owner, models

    def vlm(self, spec: str | None = "self"):
        """The engine that rates frames: the owner (``"self"``) or one loaded from a checkpoint (``spec``)."""
        if spec in (None, "self"):
            return self.owner
        if self.models is None:
            raise InputError(f"quota: scorer={spec} rates the frames with another checkpoint, which this engine "
                             "cannot load (it was built without frame models): build it with tokensieve.load(...) "
                             "or pass Engine(..., frame_models=tokensieve.FrameModels()); scorer=self rates with "
                             "the engine's own model")
        return self.models.vlm(spec, device=str(self.owner.model.device))

    def clip(self, name: str | None = None):
        """(model, preprocess, tokenizer) of an open_clip model (None, or ``tiny-clip``: the shipped one)."""
        if self.models is None:
            raise InputError(f"keyscore: clip={name or 'tiny-clip'} is an open_clip model, which this engine "
                             "cannot load (it was built without frame models): build it with tokensieve.load(...) "
                             "or pass Engine(..., frame_models=tokensieve.FrameModels())")
        return self.models.clip(name)

    def for_stage(self, pruner, options: dict):
        """The scorer of a frames stage run by ``pruner`` with ``options`` (its models loaded once), or None."""
        kind = SCORERS.get(frame_signal(pruner))
        if kind is None:
            return None
        return kind.build({name: pruner.option(options, name) for name in pruner.options}, self)

    def close(self) -> None:
        if self.models is not None and hasattr(self.models, "close"):
            self.models.close()


def check_stage(engine, index: int, stage) -> None:
    """Before any work: a frames stage's scorer can be built (its models load) and can score as asked."""
    if stage.where != "frames":
        return
    scorer = engine.frame_scorers.for_stage(get_pruner(stage.pruner), stage.options)
    if scorer is not None:
        scorer.check(f"stage {index} ({stage.describe()})")


def check_video_given(plan, video, images: list) -> None:
    """A request with images and a frames stage must bring a video (text only runs unpruned)."""
    if video is None and images and any(s.where == "frames" for s in plan.stages):
        raise PlanError("a 'frames' stage (" + next(s.describe() for s in plan.stages if s.where == "frames")
                        + ") needs a request with a video; this one has none")


def score_frames(engine, run, batch) -> list[FrameScores]:
    """Per request of the batch, the signals ``run``'s pruner declared, on the model's grid frames."""
    t0 = time.perf_counter()
    scorer = engine.frame_scorers.for_stage(run.pruner, run.stage.options)
    out = []
    for b, req in enumerate(batch.reqs):
        if scorer is None:
            out.append(FrameScores())
            continue
        got = scorer.score(req.question, req.video.frames)
        n_grid = _n_grid(batch, b)
        signals = {name: _grid_frames(v, n_grid) for name, v in got.per_frame.items()}
        out.append(FrameScores(signals={**signals, **got.per_request}, flops=got.flops))
    seconds = (time.perf_counter() - t0) / max(len(out), 1)
    for s in out:
        s.seconds = seconds
    return out


def score_instruction(engine, batch) -> list[FrameScores]:
    """Per request, signal ``llm.instruction`` (``signals.instruction_embeds``: its question's LLM input
    embeddings [M, D]), a text pass metered apart like a frames stage's scoring (a lookup: 0 FLOPs)."""
    t0 = time.perf_counter()
    out = [FrameScores(signals={"instruction": instruction_embeds(engine.adapter, engine.processor.tokenizer,
                                                                  req.question)}) for req in batch.reqs]
    seconds = (time.perf_counter() - t0) / max(len(out), 1)
    for s in out:
        s.seconds = seconds
    return out


def scoring_stats(state, b: int, n_reqs: int) -> dict:
    """Request b's scoring passes (frames stages, instruction passes): scoring_s, scoring_flops; {} if none."""
    scoring = state.frame_scoring[b::n_reqs] if state is not None else []
    if not scoring:
        return {}
    return dict(scoring_s=sum(s.seconds for s in scoring), scoring_flops=sum(s.flops for s in scoring))


def _grid_frames(per_frame: torch.Tensor, n_grid: int) -> torch.Tensor:
    """[T_sampled, ...] -> [n_grid, ...]: the max over the sampled frames of each grid frame."""
    step = max(per_frame.shape[0] // max(n_grid, 1), 1)
    return torch.stack([per_frame[g * step:(g + 1) * step].max(0).values for g in range(n_grid)])


def _n_grid(batch, b: int) -> int:
    f = batch.frames[b]
    return int(f.max()) + 1 if f.numel() and int(f.max()) >= 0 else 0


def video_stats(batch, state, b: int, kept: list[torch.Tensor]) -> dict:
    """Request b's video stats: frames sampled, their indices and times, kept tokens per grid frame, scoring cost."""
    video = batch.reqs[b].video
    if video is None:
        return {}
    frame_of = batch.frames[b]
    final = kept[-1] if kept else torch.arange(frame_of.numel())
    kept_frames = frame_of[final]
    n_grid = int(frame_of.max()) + 1
    scoring = state.frame_scoring[b::len(batch.reqs)] if state is not None else []
    return dict(frames=len(video.indices), frame_indices=list(video.indices), frame_times=list(video.times),
                tokens_per_frame=torch.bincount(kept_frames[kept_frames >= 0], minlength=n_grid).tolist(),
                video_truncated=video.truncated, frames_usable=video.frames_usable, scoring_s=sum(s.seconds for s in scoring),
                scoring_flops=sum(s.flops for s in scoring))


def select_frames(state, run, b: int, feats: torch.Tensor, entering: torch.Tensor, coords: torch.Tensor,
                  frames: torch.Tensor, signals: dict) -> Selection:
    """Run a frames stage on request b's video tokens; lift the result to all its entering tokens.

    feats [n, D], entering [n] original indices, coords [n, 3], frames [n] (-1: an image's token).
    Returns a Selection over the n entering tokens: the images' tokens kept as they are.
    """
    vid = (frames >= 0).nonzero().flatten()
    img = (frames < 0).nonzero().flatten()
    sub_coords = torch.stack([frames[vid], coords[vid, 1], coords[vid, 2]], dim=1)
    sel = state.select(run, run.keep[b], feats[vid.to(feats.device)], sub_coords, frames=frames[vid], request=b,
                       sizes=state.sizes(b, entering.numel())[vid], **signals)
    kept_vid = vid[sel.keep_idx.cpu()]
    keep_idx = torch.cat([img, kept_vid]).sort().values
    position = torch.full((entering.numel(),), -1, dtype=torch.long)
    position[keep_idx] = torch.arange(keep_idx.numel())
    groups = torch.full((entering.numel(),), -1, dtype=torch.long)
    groups[img] = position[img]
    sub_groups = sel.groups.cpu() if sel.groups is not None else None
    if sub_groups is None:
        groups[kept_vid] = position[kept_vid]
    else:
        merged = sub_groups >= 0
        groups[vid[merged]] = position[kept_vid[sub_groups[merged]]]
    tokens = None
    if sel.tokens is not None:
        tokens = feats[keep_idx.to(feats.device)].clone()
        tokens[position[kept_vid].to(feats.device)] = sel.tokens.to(feats.dtype)
    scores = None
    if sel.scores is not None:
        scores = torch.full((entering.numel(),), float("nan"))
        scores[vid] = sel.scores.detach().float().cpu()
    return Selection(keep_idx=keep_idx.to(feats.device), scores=scores, tokens=tokens, groups=groups)

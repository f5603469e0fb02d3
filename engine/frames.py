"""Frames stages: a video's budget shared out over its frames, and the passes that score the frames.

A pruner acting at ``where="frames"`` declares the signal it reads (``Pruner.frame_signal``):

    "relevance"  a VLM rates every sampled frame against the question (QuoTA): one batched pass of
                 single-frame yes/no prompts, score = P(yes) from the first answer token's logits;
                 optionally the VLM first lists the objects the question needs (query decoupling).
                 The rater is the loaded model (``scorer=self``) or another checkpoint (``scorer=PATH``).
    "clip"       open_clip embeddings of every frame and of the question (KeyScore); ``clip=`` names
                 an open_clip model or a ``local-dir:`` checkpoint (default: the shipped tiny-clip).

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
from .errors import InputError, PlanError


@dataclass
class FrameScores:
    """One request's frame signals for a frames stage, and what computing them cost."""

    signals: dict = field(default_factory=dict)  # frame_relevance [T] | frame_embeds [T, E] + text_embed [E]
    seconds: float = 0.0
    flops: int = 0


class FrameScorers:
    """The models one engine's frames stages score with, loaded on first use and kept for its life."""

    def __init__(self, engine):
        self.engine = engine
        self.loaded: dict = {}

    def vlm(self, spec: str | None = "self"):
        """The engine that rates frames: the owner (``"self"``) or one loaded from a checkpoint path."""
        if spec in (None, "self"):
            return self.engine
        if spec not in self.loaded:
            from .. import load

            self.loaded[spec] = load(spec, device=str(self.engine.model.device))
        return self.loaded[spec]

    def clip(self, name: str | None = None):
        """(model, preprocess, tokenizer) of an open_clip model (default, or the name ``tiny-clip``: the shipped one)."""
        from .. import shipped  # the facade's package data (issue 42: the frames scorers move out of the engine)

        if name is None or name == shipped.CLIP:
            name = "local-dir:" + shipped.path(shipped.CLIP)
        if ("clip", name) not in self.loaded:
            try:
                import open_clip
            except ImportError:
                raise InputError("keyscore needs open_clip (pip install 'tokensieve[clip]')") from None
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(name)
            except Exception as e:  # open_clip raises several types for unknown names / missing files
                raise InputError(f"keyscore: cannot load the open_clip model '{name}': {e}") from None
            self.loaded[("clip", name)] = (model.eval(), preprocess, open_clip.get_tokenizer(name))
        return self.loaded[("clip", name)]

    def close(self) -> None:
        for value in self.loaded.values():
            if hasattr(value, "close"):
                value.close()
        self.loaded.clear()


def check_stage(engine, index: int, stage) -> None:
    """Before any work: a "relevance" stage's rater loads and can say the answer it is asked for."""
    pruner = get_pruner(stage.pruner)
    if pruner.frame_signal != "relevance":
        return
    rater = engine.frame_scorers.vlm(pruner.option(stage.options, "scorer"))
    word = pruner.option(stage.options, "yes")
    if not _word_ids(rater.processor.tokenizer, word):
        raise PlanError(f"stage {index} ({stage.describe()}): the rater's tokenizer has no token for the answer "
                        f"{word!r}; give yes=/no= words it knows (and a prompt asking for them)")


def score_frames(engine, run, batch) -> list[FrameScores]:
    """Per request of the batch, the signal ``run``'s pruner declared (one pass per batch)."""
    t0 = time.perf_counter()
    kind = run.pruner.frame_signal
    if kind == "relevance":
        out = _relevance(engine, run, batch)
    elif kind == "clip":
        out = _clip(engine, run, batch)
    else:
        out = [FrameScores() for _ in batch.reqs]
    seconds = (time.perf_counter() - t0) / max(len(out), 1)
    for s in out:
        s.seconds = seconds
    return out


def _grid_frames(per_frame: torch.Tensor, n_grid: int) -> torch.Tensor:
    """[T_sampled, ...] -> [n_grid, ...]: the max over the sampled frames of each grid frame."""
    step = max(per_frame.shape[0] // max(n_grid, 1), 1)
    return torch.stack([per_frame[g * step:(g + 1) * step].max(0).values for g in range(n_grid)])


def _n_grid(batch, b: int) -> int:
    f = batch.frames[b]
    return int(f.max()) + 1 if f.numel() and int(f.max()) >= 0 else 0


def _relevance(engine, run, batch) -> list[FrameScores]:
    from ..pruners import quota

    def opt(name):
        return run.pruner.option(run.stage.options, name)

    rater = engine.frame_scorers.vlm(opt("scorer"))
    tok = rater.processor.tokenizer
    yes_ids, no_ids = _word_ids(tok, opt("yes")), _word_ids(tok, opt("no"))
    out = []
    for b, req in enumerate(batch.reqs):
        question, flops = req.question, 0
        objects = opt("objects")
        objects = [objects] if isinstance(objects, str) else objects
        if objects is None and opt("decouple"):
            res = rater.generate(quota.decoupling_prompt(question, opt("decouple_prompt")), plan=[],
                                 max_new_tokens=opt("decouple_tokens"))
            objects = quota.parse_objects(res.text) or None
            flops += res.stats["prefill_flops"]
        prompt = quota.rating_prompt(question, objects, opt("prompt"), opt("object_prompt"))
        rated = rater.generate_batch([{"prompt": prompt, "images": [f], "plan": [], "max_new_tokens": 1}
                                      for f in req.video.frames], batch_size=opt("scorer_batch"),
                                     output_logits=True)
        logits = torch.stack([r.logits[0] for r in rated])  # [T, V]
        p = quota.yes_probability(logits, yes_ids, no_ids)
        flops += sum(r.stats["prefill_flops"] + r.stats["vision_flops"] for r in rated)
        out.append(FrameScores(signals={"frame_relevance": _grid_frames(p, _n_grid(batch, b))}, flops=flops))
    return out


def _word_ids(tokenizer, word: str) -> list[int]:
    """Ids of the first token of ``word`` and of `` word`` (a tokenizer may mark a leading space)."""
    ids = {tokenizer.encode(w, add_special_tokens=False)[0] for w in (word, " " + word)
           if tokenizer.encode(w, add_special_tokens=False)}
    return sorted(ids - {tokenizer.unk_token_id})


def _clip(engine, run, batch) -> list[FrameScores]:
    from torch.utils.flop_counter import FlopCounterMode

    model, preprocess, tokenizer = engine.frame_scorers.clip(run.pruner.option(run.stage.options, "clip"))
    out = []
    for b, req in enumerate(batch.reqs):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            frames = model.encode_image(torch.stack([preprocess(f) for f in req.video.frames]))
            text = model.encode_text(tokenizer([req.question]))[0]
        out.append(FrameScores(signals={"frame_embeds": _grid_frames(frames.float(), _n_grid(batch, b)),
                                        "text_embed": text.float()}, flops=int(counter.get_total_flops())))
    return out


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
    sel = state.select(run, run.keep[b], feats[vid.to(feats.device)], sub_coords, frames=frames[vid],
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

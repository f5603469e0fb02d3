"""A request's Result, and how the generate path builds it from a finished batch (text, kept sets, stats)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import frames, metering
from .budget import budget_stats
from .plan import Plan
from .vocabulary import unknown_words


@dataclass(repr=False)
class Result:
    """One request's answer.

    kept:   per stage, sorted original visual-token indices that survive it (LongTensor [k])
    scores: per stage, the importance of each token entering it ([N_in]) or None
    groups: per stage, [N_vis]: for every original visual token, the position in that stage's
            ``kept`` of the token it is part of after the stage (merged or itself), -1 if dropped
    stats:  visual_tokens, kept_tokens, per_layer_kv_len, kv_cache_bytes, prefill_flops,
            vision_flops, prefill_s, decode_s, new_tokens; with a video also frames, frame_indices,
            frame_times, tokens_per_frame (kept per frame of the token grid), video_truncated,
            frames_usable (a truncated file: the frames it really has), and
            scoring_s, scoring_flops (frames stages' scoring passes, apart from the prefill; on a request
            without video, those of its instruction passes: ``llm.instruction``); with a keep=auto
            stage, budgets: per such stage its rule, value, entering, budget, kept, reached, clipped
            (engine/budget.py)
    """

    text: str
    token_ids: list[int]
    kept: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor | None] = field(default_factory=list)
    groups: list[torch.Tensor] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    plan: Plan = field(default_factory=Plan)
    coords: torch.Tensor | None = None  # [N_vis, 3] (item, row, col) of every original visual token
    frames: torch.Tensor | None = None  # [N_vis] the video frame of every original visual token (-1: an image's)
    n_images: int = 0
    logits: torch.Tensor | None = None  # [new_tokens, V] fp32, with generate(..., output_logits=True)
    unknown_words: list[str] = field(default_factory=list)  # the question's words the model was never trained on

    def __repr__(self) -> str:
        """One line: the answer, the visual tokens kept and the times (the tensors stay in the fields)."""
        st = self.stats
        parts = [f"text={self.text!r}"]
        if "kept_tokens" in st:
            parts.append(f"kept={st['kept_tokens']}/{st['visual_tokens']} visual tokens")
        if "prefill_s" in st:
            parts.append(f"prefill={1e3 * st['prefill_s']:.1f} ms, decode={1e3 * st['decode_s']:.1f} ms "
                         f"({st['new_tokens']} tokens)")
        parts.append(f"plan={str(self.plan) or '(none)'!r}")
        if self.unknown_words:
            parts.append(f"not understood: {', '.join(self.unknown_words)}")
        return f"Result({', '.join(parts)})"


def build_results(engine, batch, state, tokens, logits, n_text, prefill_s, decode_s) -> list[Result]:
    """tokens [B, T] (pad after EOS), logits [B, T, V] or None -> one Result per request of the batch."""
    tcfg = engine.adapter.text_config
    n_layers = tcfg.num_hidden_layers
    plan = batch.reqs[0].plan
    elem = next(engine.model.parameters()).element_size()
    results = []
    for b, r in enumerate(batch.reqs):
        ids = tokens[b].tolist()
        new = answer_length(ids, engine.eos_ids)
        kept = [state.kept[i][b] for i in range(len(plan.stages))] if state is not None else []
        steps = {k: v for run in (state.llm_stages.values() if state is not None else ()) if run.alive_at
                 for k, v in run.alive_at[b].items()}
        alive_per_layer = metering.visual_tokens_per_layer(plan.stages, kept, batch.n_visual[b], n_layers, steps)
        prefill_tokens = [n_text[b] + a for a in alive_per_layer]
        fed = len(ids) - 1  # every sampled token but the last went through the model
        kv_len = [n + fed for n in prefill_tokens]
        stats = dict(
            visual_tokens=batch.n_visual[b], kept_tokens=alive_per_layer[-1], per_layer_kv_len=kv_len,
            kv_cache_bytes=metering.kv_cache_bytes(kv_len, tcfg, elem),
            prefill_flops=metering.prefill_flops(prefill_tokens, tcfg),
            vision_flops=vision_flops(engine, state, b, batch.tower_seqs[b]),
            prefill_s=prefill_s, decode_s=decode_s, new_tokens=new, batch_size=len(batch.reqs))
        stats.update(frames.video_stats(batch, state, b, kept) or frames.scoring_stats(state, b, len(batch.reqs)))
        if any(s.keep == "auto" for s in plan.stages):  # the budget each keep=auto stage gave it, and why
            stats["budgets"] = budget_stats(plan.stages, state.budgets, b) if state is not None else []
        groups = [state.groups[i][b] for i in range(len(plan.stages))] if state is not None else []
        results.append(Result(text=answer_text(engine, ids[:new]), token_ids=ids[:new], kept=kept, groups=groups,
                              scores=[state.scores[i][b] for i in range(len(plan.stages))] if state else [],
                              stats=stats, plan=plan, coords=batch.coords[b], frames=batch.frames[b],
                              n_images=len(r.images), logits=None if logits is None else logits[b, :new],
                              unknown_words=unknown_words(r.question, engine.trained_words)))
    return results


def answer_length(ids: list[int], eos_ids) -> int:
    """The answer's tokens: up to and including the first end-of-sequence token."""
    return next((i + 1 for i, t in enumerate(ids) if t in eos_ids), len(ids))


def answer_text(engine, ids: list[int]) -> str:
    return engine.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


def vision_flops(engine, state, b: int, seqs: list[int]) -> int:
    """Tower FLOPs of request b: its tower sequences (one per image / tile, images first), each image's as long
    as the vision stages left it at every layer (``state.tower_patches``)."""
    vcfg = getattr(engine.model.config, "vision_config", None)
    if vcfg is None or not seqs:
        return 0
    n_layers = getattr(vcfg, "num_hidden_layers", None) or getattr(vcfg, "depth")
    patches = state.tower_patches if state is not None else {}
    per_layer = []
    for layer in range(n_layers):
        if layer in patches:
            seqs = [(engine.adapter.vision_prefix or 0) + k for k in patches[layer][b]] + seqs[len(patches[layer][b]):]
        per_layer.append(list(seqs))
    return metering.vision_flops(per_layer, vcfg)

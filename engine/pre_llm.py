"""The frames and pre-LLM stages: between the vision tower and the LLM, each stage selects (or merges) every
request's visual features, reading the signals its pruner declares (tower scores mapped to the LLM's tokens,
the question's embeddings, frame scores, a request's priority)."""
from __future__ import annotations

import torch

from . import frames
from .batch import Batch
from .signals import reads, request_signals


def run_pre_llm_stages(engine, batch: Batch, inputs: dict, feats: list, alive: list, state) -> tuple[list, list]:
    """The frames and pre-LLM stages, in plan order, on each request's features.

    feats: per request [N_b, D] visual features (None: no visual input); alive: per request [N_b] their original
    visual-token indices. Returns both after every stage (the kept tokens, merged ones as their group's token)."""
    for run in state.pre_llm_stages if state is not None else []:
        if run.stage.where == "frames":
            scored = frames.score_frames(engine, run, batch)
            state.frame_scoring.extend(scored)
        elif reads(run.pruner, "llm.instruction"):  # the question's embeddings, metered apart
            scored = frames.score_instruction(engine, batch)
            state.frame_scoring.extend(scored)
        tower = tower_per_request(engine.adapter, run, batch, inputs, state)
        for b in range(len(batch.reqs)):
            coords, frame_of = batch.coords[b][alive[b]], batch.frames[b][alive[b]]
            if run.stage.where == "frames":
                before = None
                sel = frames.select_frames(state, run, b, feats[b], alive[b], coords, frame_of, scored[b].signals)
            else:
                signals = {k: v if v.shape[0] == alive[b].numel() else v[alive[b]] for k, v in tower[b].items()}
                merges_features = reads(run.pruner, "tower.features")
                before = state.tower_feats[b] if merges_features and state.tower_feats else None
                if reads(run.pruner, "llm.instruction"):
                    signals.update(scored[b].signals)
                if batch.reqs[b].priority is not None and reads(run.pruner, "request.priority"):
                    signals["priority"] = batch.reqs[b].priority[alive[b]]
                signals.update(request_signals(engine.adapter, run, batch.reqs[b].question,
                                               state.tower_feats[b] if state.tower_feats else None))
                sel = state.select(run, run.keep[b], feats[b] if before is None else before, coords,
                                   sizes=state.sizes(b, alive[b].numel()), request=b,
                                   frames=frame_of if batch.n_video(b) else None, **signals)
            state.follow_tower_feats(b, sel, merged_before_projector=before is not None)
            if sel.tokens is None:
                feats[b] = feats[b][sel.keep_idx]
            elif before is not None:  # merged on the projector's input: project the merged tokens
                feats[b] = engine.adapter.project(sel.tokens.to(before.dtype)).to(feats[b].dtype)
            else:
                feats[b] = sel.tokens.to(feats[b].dtype)
            alive[b] = state.record(run, b, alive[b], sel)
    return feats, alive

def tower_per_request(adapter, run, batch: Batch, inputs: dict, state) -> list[dict]:
    """A stage's tower signals (tower_score [N], keys [N, d]) mapped to each request's visual tokens."""
    score, keys = state.tower_signals(run)
    out = [{} for _ in batch.reqs]
    video = video_tower_score(adapter, run, inputs, state)
    for name, values in (("tower_score", score), ("keys", keys)):
        if values is None:
            continue
        flat = values.dim() == 2  # [n, P] scores; [n, P, C] channels
        per_image = adapter.tower_to_tokens(values[..., None] if flat else values, inputs)
        for b, ims in enumerate(batch.images_of):
            if ims:
                v = torch.cat([per_image[i] for i in ims])
                out[b][name] = v[:, 0] if flat else v
    for b, vid in enumerate(batch.video_of):  # a native video's tokens: their scores beside the images'
        if video is not None and vid is not None:
            is_vid = batch.is_video[b]
            score_b = torch.zeros(is_vid.numel(), device=video[vid].device)
            if "tower_score" in out[b]:
                score_b[~is_vid] = out[b]["tower_score"].float().to(score_b.device)
            score_b[is_vid] = video[vid].float()
            out[b]["tower_score"] = score_b
    return out

def video_tower_score(adapter, run, inputs: dict, state) -> list[torch.Tensor] | None:
    """Per native video [N_v] the stage's ``tower_score`` from the video tower pass, or None where none."""
    if state.video_tower is None or not run.tower_layers:
        return None
    score = run.pruner.tower_score(state.video_tower, run.tower_layers)
    return None if score is None else [v[:, 0] for v in adapter.video_tower_to_tokens(score[..., None], inputs)]

"""Phase 1 of ``train_tiny``: the tower and projector alone learn the per-token targets (``objectives.cell_targets``),
no language model. ``capture`` is the list the forward hook on ``tiny_models.visual_tokens`` appends to."""
from __future__ import annotations

import random

import torch

from . import native_video, world
from .objectives import TARGETS, aux_logits, aux_loss, cell_targets
from .tiny_models import GRID, IMAGE, VIDEO_FRAMES


def tower_tokens(model, proc, capture: list, scenes: list) -> torch.Tensor:
    """The LLM's visual tokens for these scenes, from the tower and projector alone: [n, GRID * GRID, D]."""
    capture.clear()
    model.model.get_image_features(**proc.image_processor([world.render(s) for s in scenes], return_tensors="pt"))
    return capture[0].reshape(len(scenes), GRID * GRID, -1)


def native_tokens(model, proc, capture: list, videos: list[list]) -> torch.Tensor:
    """The LLM's visual tokens of these videos (each a list of scenes) entering as native videos, from the
    tower and projector alone: [n_videos * n_frames / 2, GRID * GRID, D], one grid per temporal patch."""
    capture.clear()
    inputs = proc.video_processor(**native_video.video_kwargs(proc, [[world.render(s) for s in v] for v in videos]),
                                  return_tensors="pt")
    model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    return capture[0].reshape(-1, GRID * GRID, capture[0].shape[-1])


def native_patches(model, proc, capture: list, rng: random.Random, n: int, layout=lambda: "lattice"
                   ) -> tuple[torch.Tensor, list]:
    """About ``n`` temporal patches: n / 4 fresh world videos of 8 frames (``layout()`` each) entering natively;
    their tokens [n_patches, GRID * GRID, D] and one target scene per patch (``native_video.temporal_groups``)."""
    videos = [world.random_video(rng, n_frames=VIDEO_FRAMES, size=IMAGE, layout=layout()).frames
              for _ in range(max(1, n * native_video.TEMPORAL_PATCH // VIDEO_FRAMES))]
    groups = [g for v in videos for g in native_video.temporal_groups(v)]
    return native_tokens(model, proc, capture, videos), groups


def _layout(rng: random.Random, free_fraction: float) -> str:
    return "free" if free_fraction > 0 and rng.random() < free_fraction else "lattice"


def tower_step(model, proc, head, capture: list, rng: random.Random, n: int, free_fraction: float = 0.0,
               native_fraction: float = 0.0) -> torch.Tensor:
    """The per-token loss on ``n`` fresh grids: still scenes, a ``free_fraction`` share with objects anywhere;
    or, a ``native_fraction`` share of the steps, the temporal patches of n / 4 world videos of 8 frames
    entering natively (targets: ``native_video.temporal_groups``). 0: no extra draw is made."""
    if native_fraction > 0 and rng.random() < native_fraction:
        tokens, groups = native_patches(model, proc, capture, rng, n, lambda: _layout(rng, free_fraction))
        return aux_loss(aux_logits(head, tokens, len(groups)), cell_targets(groups))
    scenes = [world.random_scene(rng, size=IMAGE, layout=_layout(rng, free_fraction)) for _ in range(n)]
    return aux_loss(aux_logits(head, tower_tokens(model, proc, capture, scenes), n), cell_targets(scenes))


@torch.no_grad()
def tower_accuracy(model, proc, head, capture: list, seed: int, n: int = 64, native: bool = False) -> dict:
    """Held-out accuracy of the per-token heads on the cells an object covers (TARGETS): on ``n`` still
    lattice scenes, or with ``native`` on the temporal patches of n / 4 lattice videos entering natively."""
    rng = random.Random(seed)
    if native:
        tokens, scenes = native_patches(model, proc, capture, rng, n)
    else:
        scenes = [world.random_scene(rng, size=IMAGE) for _ in range(n)]
        tokens = tower_tokens(model, proc, capture, scenes)
    logits = aux_logits(head, tokens, len(scenes))
    cells = cell_targets(scenes)
    obj = cells[..., 1] > 0
    return {name: round((lg.argmax(-1)[obj] == cells[..., i][obj]).float().mean().item(), 4)
            for i, (name, lg) in enumerate(zip(TARGETS, logits))}

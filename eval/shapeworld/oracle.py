"""The oracle of the pruning report: the shape world's ground truth decides which tokens to keep.

Evaluation only: a user's request has no ground truth. The oracle ranks each visual token (one per cell
of a frame's ``grid`` x ``grid`` raster, frames in order) by what its cell shows:

    2 + cover   the cell shows an object the question is about (``QA.refs``), cover = the share it fills
    1 + cover   it shows another object
    0 .. 0.5    background, coarse to fine (every 4th cell of every 4th row first, then every 2nd, then the
                rest), so the background a budget keeps is spread over the frame

and the engine's ``priority`` pruner keeps the highest (``priority:keep=...`` with the ranks as the
request's ``priority``). Its accuracy is the report's upper bound at each budget. A video entering natively
(Qwen2-VL: one token grid per temporal patch of two frames) is ranked per video token by
``per_video_token``: a token ranks as the best of its patch's frames at its cell.
"""
from __future__ import annotations

import numpy as np
import torch

from . import world


def oracle_priority(scenes: list[world.Scene], refs: tuple[int, ...], grid: int) -> torch.Tensor:
    """[len(scenes) * grid * grid] the oracle's rank of every visual token (module docstring), raster order."""
    out = []
    for scene in scenes:
        cover = world.cell_cover(scene, grid)  # [n_objects, grid * grid]
        about = np.array([o.uid in refs for o in scene.objects], dtype=bool)
        target = cover[about].max(0) if about.any() else np.zeros(grid * grid)
        other = cover[~about].max(0) if (~about).any() else np.zeros(grid * grid)
        out.append(np.where(target > 0, 2 + target, np.where(other > 0, 1 + other, coarse_to_fine(grid))))
    return torch.tensor(np.concatenate(out), dtype=torch.float32)


def coarse_to_fine(grid: int) -> np.ndarray:
    """[grid * grid] in [0, 0.5]: 0.5 on every 4th cell of every 4th row (offset 1), 0.25 on every 2nd of every
    2nd, 0 elsewhere: a background budget taken from the top spreads over the whole frame."""
    r, c = np.divmod(np.arange(grid * grid), grid)
    return np.where((r % 4 == 1) & (c % 4 == 1), 0.5, np.where((r % 2 == 1) & (c % 2 == 1), 0.25, 0.0))


def per_video_token(per_frame: torch.Tensor, coords: torch.Tensor, grid: int) -> torch.Tensor:
    """The oracle's ranks of a native video's tokens.

    per_frame: [n_frames * grid * grid] ``oracle_priority`` of the video's frames, raster order.
    coords:    [N_v, 3] (temporal patch t, row, col) of each video token (``adapter.video_coords``); the
               n_frames frames split into equal consecutive temporal patches.
    returns    [N_v]: each token's rank, the highest its cell has in the frames of its patch.
    """
    n_patches = int(coords[:, 0].max()) + 1
    frames = per_frame.view(-1, grid * grid)  # [n_frames, grid * grid]
    if frames.shape[0] % n_patches:
        raise ValueError(f"{frames.shape[0]} frames do not split into {n_patches} temporal patches")
    patches = frames.view(n_patches, -1, grid * grid).amax(1)  # [n_patches, grid * grid]
    t, row, col = coords.long().unbind(1)
    return patches[t, row * grid + col]

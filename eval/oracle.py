"""The oracle of the pruning report: the shape world's ground truth decides which tokens to keep.

Evaluation only: a user's request has no ground truth. The oracle ranks each visual token (one per cell
of a frame's ``grid`` x ``grid`` raster, frames in order) by what its cell shows:

    2 + cover   the cell shows an object the question is about (``QA.refs``), cover = the share it fills
    1 + cover   it shows another object
    0 .. 0.5    background, coarse to fine (every 4th cell of every 4th row first, then every 2nd, then the
                rest), so the background a budget keeps is spread over the frame

and the engine's ``priority`` pruner keeps the highest (``priority:keep=...`` with the ranks as the
request's ``priority``). Its accuracy is the report's upper bound at each budget.
"""
from __future__ import annotations

import numpy as np
import torch

from .shapeworld import world


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

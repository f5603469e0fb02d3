"""Importance maps: a Result's scores and kept sets laid back onto each image grid.

    for m in importance_maps(result):          # one per (stage, item)
        m.stage, m.item, m.score, m.kept       # score [h, w] (NaN: no score), kept [h, w] bool
        m.frame                                # the video frame the item is (-1: an image or tile)

Items are what the adapter's coords call items: an image, an anyres tile (the base tile and
the high-resolution grid of LLaVA-NeXT / OneVision, whose row-end newline tokens sit in an
extra last column), or a video frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ItemMap:
    stage: int
    item: int
    score: torch.Tensor  # [h, w] float, NaN where the stage gave no score (or the token had left already)
    kept: torch.Tensor  # [h, w] bool: the token survives this stage (as itself or a merge target)
    present: torch.Tensor  # [h, w] bool: a token exists at this cell (anyres grids are ragged)
    frame: int = -1  # the video frame this item is (a temporal patch on Qwen), -1 for an image / tile


def importance_maps(result) -> list[ItemMap]:
    """Per stage and item: the importance of the tokens entering the stage and the kept mask."""
    coords = result.coords
    if coords is None or coords.numel() == 0:
        return []
    n = coords.shape[0]
    out = []
    entering = torch.arange(n)
    for s, kept in enumerate(result.kept):
        scores = torch.full((n,), float("nan"))
        if result.scores[s] is not None:
            scores[entering] = result.scores[s].float()
        kept_mask = torch.zeros(n, dtype=torch.bool)
        kept_mask[kept] = True
        for item in coords[:, 0].unique(sorted=True).tolist():
            sel = coords[:, 0] == item
            r, c = coords[sel, 1], coords[sel, 2]
            h, w = int(r.max()) + 1, int(c.max()) + 1
            grid = torch.full((h, w), float("nan"))
            grid[r, c] = scores[sel]
            keep = torch.zeros(h, w, dtype=torch.bool)
            keep[r, c] = kept_mask[sel]
            present = torch.zeros(h, w, dtype=torch.bool)
            present[r, c] = True
            frame = int(result.frames[sel][0]) if getattr(result, "frames", None) is not None else -1
            out.append(ItemMap(stage=s, item=item, score=grid, kept=keep, present=present, frame=frame))
        entering = kept
    return out

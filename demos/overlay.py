"""Pictures of what a plan kept: each image (or video frame) with its token grid's importance as a heatmap,
the kept tokens outlined and the dropped ones dimmed. Pure functions of an image and an ``ItemMap``."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

SIDE = 320  # pixels of the longer side of a drawn overlay
KEPT = (60, 220, 90)  # outline of a kept token


def final_map(maps: list, item: int):
    """(score [h, w] or None, kept [h, w] bool) of one item after the plan's last stage: the kept set that
    reaches the LLM, and the importance from the last stage that scored its tokens."""
    mine = [m for m in maps if m.item == item]
    if not mine:
        return None, None
    last = max(mine, key=lambda m: m.stage)
    scored = [m for m in mine if not torch.isnan(m.score).all()]
    return (max(scored, key=lambda m: m.stage).score if scored else None), last.kept


def draw(image: Image.Image, score: torch.Tensor | None, kept: torch.Tensor | None, grid: tuple[int, int]) -> Image.Image:
    """The image scaled to SIDE, a heatmap of ``score`` [h, w] (NaN: none), ``kept`` [h, w] outlined and the
    rest dimmed; ``grid`` (h, w) when there is no map (every token kept)."""
    w0, h0 = image.size
    scale = SIDE / max(w0, h0)
    out = image.convert("RGB").resize((max(1, round(w0 * scale)), max(1, round(h0 * scale))), Image.BILINEAR)
    h, w = (kept.shape if kept is not None else grid)
    if score is not None:
        s = score.float().numpy()
        finite = np.isfinite(s)
        if finite.any():
            lo, hi = float(s[finite].min()), float(s[finite].max())
            norm = np.where(finite, (s - lo) / (hi - lo if hi > lo else 1.0), 0.0)
            heat = np.zeros((h, w, 4), np.uint8)
            heat[..., 0] = 255
            heat[..., 1] = (200 * (1 - norm)).astype(np.uint8)
            heat[..., 3] = np.where(finite, 40 + 120 * norm, 0).astype(np.uint8)
            layer = Image.fromarray(heat, "RGBA").resize(out.size, Image.NEAREST)
            out = Image.alpha_composite(out.convert("RGBA"), layer).convert("RGB")
    pen = ImageDraw.Draw(out, "RGBA")
    cw, ch = out.width / w, out.height / h
    for r in range(h):
        for c in range(w):
            box = (c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1)
            if kept is None or bool(kept[r, c]):
                pen.rectangle(box, outline=KEPT + (255,), width=1)
            else:
                pen.rectangle(box, fill=(0, 0, 0, 150))
    return out


def image_overlays(result, images: list[Image.Image]) -> list[tuple[Image.Image, str]]:
    """One (overlay, caption) per item of a request's images (an image, or each anyres tile over it)."""
    from ..engine.maps import importance_maps

    maps = importance_maps(result)
    coords = result.coords
    out = []
    for item in coords[:, 0].unique(sorted=True).tolist():
        sel = coords[:, 0] == item
        grid = (int(coords[sel, 1].max()) + 1, int(coords[sel, 2].max()) + 1)
        score, kept = final_map(maps, item)
        n, k = int(sel.sum()), (int(kept.sum()) if kept is not None else int(sel.sum()))
        image = images[min(item, len(images) - 1)]
        out.append((draw(image, score, kept, grid), f"item {item}: {k} / {n} tokens kept"))
    return out


def frame_overlays(result, frames: list[Image.Image], budget: int) -> list[tuple[Image.Image, str]]:
    """One (overlay, caption) per frame of the token grid of a request's video: its kept tokens and its share
    of the kept total (``budget``)."""
    from ..engine.maps import importance_maps

    maps = importance_maps(result)
    coords, of_frame = result.coords, result.frames
    n_grid = int(of_frame.max()) + 1 if of_frame.numel() else 0
    step = max(1, len(frames) // max(n_grid, 1))  # Qwen: a grid frame is a temporal patch of `step` frames
    out = []
    for t in range(n_grid):
        sel = of_frame == t
        items = coords[sel, 0].unique().tolist()
        item = items[0]
        grid = (int(coords[sel, 1].max()) + 1, int(coords[sel, 2].max()) + 1)
        score, kept = final_map(maps, item)
        k = int(kept.sum()) if kept is not None else int(sel.sum())
        share = k / budget if budget else 0.0
        out.append((draw(frames[min(t * step, len(frames) - 1)], score, kept, grid),
                    f"frame {t}: {k} kept ({share:.0%} of the budget)"))
    return out


def sheet(pictures: list[tuple[Image.Image, str]], per_row: int = 2, tile: int | None = None,
          font_size: int = 17) -> Image.Image:
    """Every (image, caption) of ``pictures`` on one white sheet, in order, ``per_row`` a row: each image
    scaled to ``tile`` pixels wide (default: SIDE for one picture, 200 for more) with its caption written under
    it (wrapped to the tile), so that all of a column's frames are seen at once."""
    from PIL import ImageFont

    tile = tile or (SIDE if len(pictures) == 1 else 200)
    font = ImageFont.load_default(size=font_size)
    per_row = max(1, min(per_row, len(pictures)))
    scaled = [img.convert("RGB").resize((tile, max(1, round(img.height * tile / img.width))), Image.BILINEAR)
              for img, _ in pictures]
    lines = [_wrap(caption, font, tile) for _, caption in pictures]
    line_h, gap = font_size + 4, 6
    cell_h = max(s.height for s in scaled) + max(len(ls) for ls in lines) * line_h + gap
    rows = -(-len(pictures) // per_row)
    out = Image.new("RGB", (per_row * (tile + gap) - gap, rows * cell_h), "white")
    pen = ImageDraw.Draw(out)
    for i, (img, ls) in enumerate(zip(scaled, lines)):
        x, y = (i % per_row) * (tile + gap), (i // per_row) * cell_h
        out.paste(img, (x, y))
        for j, line in enumerate(ls):
            pen.text((x, y + img.height + 2 + j * line_h), line, fill=(20, 20, 20), font=font)
    return out


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels in ``font`` (a longer word stays whole)."""
    lines = [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(trial) > width:
            lines.append(word)
        else:
            lines[-1] = trial
    return lines

"""Per-token targets of video examples: which frame first shows each object ("new"), where each
object token should look back to know it, and each frame's summary token (``train_tiny``'s novelty,
look-back and frame losses; the losses themselves are in ``objectives``).

Pure functions of the world's scenes and the batch's token ids (B examples, L tokens)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import world
from .tiny_models import GRID


class FrameTargets(NamedTuple):
    """Per video frame, at its last visual token (F frames in the batch; ``frame_targets``)."""
    rows: torch.Tensor  # [F] example index
    pos: torch.Tensor  # [F] position of the frame's last visual token
    new: torch.Tensor  # [F] long: 1 if the frame shows an object no earlier frame showed
    share: torch.Tensor  # [F, L] that token's layer-2 attention target: the new object's tokens, else the sink


def frame_targets(proc, examples: list[dict], ids: torch.Tensor) -> FrameTargets | None:
    """Each video frame's last visual token as the frame's summary: whether the frame shows an object
    first (``new``; the world's video objects have distinct names and each first shows at its own
    segment, so the number of such frames is the answer to "how many distinct objects appeared ?")
    and where its layer-2 attention should look to know it: uniform over the new object's tokens
    (whose layer-1 states tell "new", ``novelty_targets``), else all on the sink (the first token).
    None without video examples. ids [B, L]."""
    rows, pos, new, shares = [], [], [], []
    pad = proc.tokenizer.pad_token_id
    for b, ex, slots, cells, first in video_examples(proc, examples, ids):
        sink = int((ids[b] != pad).nonzero()[0])
        for f, (scene, by_uid) in enumerate(zip(ex["scenes"], cells)):
            share = torch.zeros(ids.shape[1])
            fresh = [o for o in scene.objects if first[o.uid] == f]
            for o in fresh:  # (an object covering no cell by 10%: its centre's token)
                share[slots[f, by_uid[o.uid] or [world.centre_cell(o, GRID)]]] = 1.0
            if not fresh:
                share[sink] = 1.0
            rows.append(b), pos.append(int(slots[f, -1])), new.append(int(bool(fresh))), shares.append(share / share.sum())
    if not rows:
        return None
    return FrameTargets(torch.tensor(rows), torch.tensor(pos), torch.tensor(new), torch.stack(shares))


class LookTargets(NamedTuple):
    """Per video object token (N of them in the batch; ``look_targets``)."""
    rows: torch.Tensor  # [N] example index
    pos: torch.Tensor  # [N] position of the token
    share: torch.Tensor  # [N, L] its attention target: its object's tokens in the last earlier frame, else the sink


def look_targets(proc, examples: list[dict], ids: torch.Tensor, centres: bool = False) -> LookTargets | None:
    """Where each video object token (the tokens ``novelty_targets`` marks, with ``centres`` too) should look to tell whether
    its object is new: uniform over the same object's tokens in the last earlier frame that shows it
    (the world's objects move at most one cell a segment and never come back, so that is the previous
    frame), or all on the sink (the first token) in the object's first frame. The lookup a reader of
    "new" needs, given as an attention target (``share_loss``): a loss on the reader alone reaches the
    attention only through a softmax that may sit at 0 (Qwen2-VL's novelty loss stayed near chance).
    None without video examples. ids [B, L]."""
    rows, pos, shares = [], [], []
    pad = proc.tokenizer.pad_token_id
    for b, ex, slots, cells, first in video_examples(proc, examples, ids):
        sink = int((ids[b] != pad).nonzero()[0])
        last_seen: dict[int, list[int]] = {}  # uid -> its positions in the last frame that showed it
        for f, (scene, by_uid) in enumerate(zip(ex["scenes"], cells)):
            for o in scene.objects:
                share = torch.zeros(ids.shape[1])
                if o.uid in last_seen:
                    share[last_seen[o.uid]] = 1.0
                else:
                    share[sink] = 1.0
                where = [world.centre_cell(o, GRID)] if centres else by_uid[o.uid]
                for p in slots[f, where].tolist():
                    rows.append(b), pos.append(p), shares.append(share / share.sum())
            last_seen.update({o.uid: slots[f, by_uid[o.uid] or [world.centre_cell(o, GRID)]].tolist()
                              for o in scene.objects})
    if not rows:
        return None
    return LookTargets(torch.tensor(rows), torch.tensor(pos), torch.stack(shares))


def frame_slots(proc, ids: torch.Tensor, n_frames: int) -> torch.Tensor:
    """[n_frames, GRID * GRID] the positions of each image's (frame's) visual tokens in ``ids`` [L]; in a
    sequence with no image but a native video (``native_video``), of each temporal patch's video tokens
    (the processor lays a video out patch by patch, each patch's grid row-major)."""
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    where = (ids == image_id).nonzero().flatten()
    if not len(where) and getattr(proc, "video_token", None) is not None:
        where = (ids == proc.tokenizer.convert_tokens_to_ids(proc.video_token)).nonzero().flatten()
    return where.reshape(n_frames, GRID * GRID)


def video_examples(proc, examples: list[dict], ids: torch.Tensor):
    """For each video example (two frames or more): its row b, the example, ``frame_slots`` [frames, 64],
    per frame ``world.object_cells`` and ``first_frames`` (uid -> first frame it shows in)."""
    for b, ex in enumerate(examples):
        if len(ex["scenes"]) < 2:
            continue
        cells = [world.object_cells(s, GRID) for s in ex["scenes"]]
        yield b, ex, frame_slots(proc, ids[b], len(ex["scenes"])), cells, first_frames(cells)


def first_frames(cells: list[dict]) -> dict[int, int]:
    """uid -> the first frame it shows in; cells: per frame, ``world.object_cells`` (uid -> token indices)."""
    first: dict[int, int] = {}
    for f, by_uid in enumerate(cells):
        for uid in by_uid:
            first.setdefault(uid, f)
    return first


def novelty_targets(proc, examples: list[dict], ids: torch.Tensor, centres: bool = False) -> torch.Tensor:
    """[B, L] long: on a video frame's tokens that show an object, 1 where this is the first frame it
    shows in ("new": no earlier frame showed that colour and shape, the world's video objects having
    distinct names), 0 where an earlier frame showed it; -100 on every other token (background, text,
    still images). The number of objects ever new is the answer to "how many distinct objects
    appeared ?": a causal LM can tell "new" at a token by looking back for its name, one lookup.

    With ``centres`` only the token of each object's centre (``world.cell_labels``) has
    a target: one token per object, so the number of new ones is the number of objects whatever their
    sizes (a large object covers four tokens, a small one one)."""
    out = torch.full(ids.shape, -100, dtype=torch.long)
    for b, ex, slots, cells, first in video_examples(proc, examples, ids):
        for f, (scene, by_uid) in enumerate(zip(ex["scenes"], cells)):
            for o in scene.objects:
                where = [world.centre_cell(o, GRID)] if centres else by_uid[o.uid]
                out[b, slots[f, where]] = int(first[o.uid] == f)
    return out

"""The sequence layout of a pruned batch: pure tensor functions (padding, gather indices, positions) that
``engine.py`` and ``state.py`` use to rebuild a left-padded batch from each request's surviving slots."""
from __future__ import annotations

import torch


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per image [S_i, D] -> ([n, S_max, D] right-padded with zero rows, [n, S_max] bool real rows, or None when
    every S_i is S_max)."""
    width = max(r.shape[0] for r in rows)
    if all(r.shape[0] == width for r in rows):
        return torch.stack(rows), None
    out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    real = torch.zeros(len(rows), width, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]], real[i, :r.shape[0]] = r, True
    return out, real


def left_pad_index(keep_slots: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row kept slots -> gather index [B, S'] and validity [B, S'], left padded (pad -> slot 0)."""
    width = max(int(k.numel()) for k in keep_slots)
    index = torch.zeros(len(keep_slots), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(keep_slots), width, dtype=torch.bool, device=device)
    for b, k in enumerate(keep_slots):
        if k.numel():
            index[b, width - k.numel():] = k
            valid[b, width - k.numel():] = True
    return index, valid


def renumbered(valid: torch.Tensor) -> torch.Tensor:
    """Contiguous positions of a left-padded batch: validity [B, S] -> [B, S], each row's valid tokens 0..L_b-1
    (pads 0), as if its kept sequence had been the input (``positions=contiguous``). Decode continues from L_b."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence axis. x: [B, S, ...] or [1, S, ...]; index: [B, S'] -> [B, S', ...]."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)

"""The one interface every pruner implements: tensors in, scores and kept indices out.

A pruner knows nothing of the model. The engine hands it the visual tokens entering its
stage for one request, plus whatever attention rows it declared in ``needs``; it returns
which of those tokens survive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class StageInput:
    """What a pruner sees for one request at one stage.

    tokens:   [N, D] hidden states / features of the visual tokens entering the stage
    keep:     number of tokens to keep (1 <= keep <= N)
    coords:   [N, 3] (item, row, col) of each token in its original grid (item = image, tile or frame)
    attn:     [H, N] attention these tokens receive from the declared query rows (per head, summed
              over the rows with their weights; for one row it is that row's softmax), or None
    options:  the stage's pruner options (already validated against ``option_names``)
    seed:     base seed of the request (pruners that draw randomness use it)
    """

    tokens: torch.Tensor
    keep: int
    coords: torch.Tensor
    attn: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class Selection:
    """keep_idx: [k] sorted unique indices into the N tokens entering; scores: [N] importance or None."""

    keep_idx: torch.Tensor
    scores: torch.Tensor | None = None


class Pruner:
    """Base class. Subclasses set the class attributes and implement ``select``.

    needs: the attention the pruner reads, or None.
        "last_query": at an LLM stage before layer K, the last prompt token's attention
        (all heads) over all keys, taken in layer K-1.
    """

    name: ClassVar[str]
    wheres: ClassVar[tuple[str, ...]] = ("vision", "pre_llm", "llm")
    default_where: ClassVar[str] = "pre_llm"
    default_layer: ClassVar[int | None] = None
    default_keep: ClassVar[int | float | None] = None
    option_names: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[str | None] = None

    def select(self, inp: StageInput) -> Selection:
        raise NotImplementedError


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores ([N] -> [k]), in ascending index order."""
    return torch.topk(scores.float(), k, sorted=False).indices.sort().values

"""Per-call pruning state: it travels through the model as the ``tokensieve_state`` kwarg.

transformers forwards unknown kwargs from the top-level forward down to every decoder
layer and attention function, so the hooks and the registered attention function read
the state from there. Nothing is stored on modules or at module level: a state lives
for one generate call and then holds that call's records (kept sets, scores).

Sequence bookkeeping for one padded batch (B rows). Every token keeps the *slot* it had
in the prefill layout (``seq``), so causality after pruning is simply ``seq_k <= seq_q``;
decode tokens get slots after the prefill length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from ..pruners import Pruner, Selection, StageInput
from .plan import Stage

STATE_KWARG = "tokensieve_state"


@dataclass
class StageRun:
    """One stage of the plan as it runs in this call."""

    index: int
    stage: Stage
    pruner: Pruner
    keep: list[int]  # per request row (vision stages: per image)


@dataclass
class RequestState:
    batch_size: int
    seed: int = 0
    vision_stages: dict[int, StageRun] = field(default_factory=dict)  # vision layer -> stage
    llm_stages: dict[int, StageRun] = field(default_factory=dict)  # LLM layer -> stage
    vision_layer_of: dict[int, int] = field(default_factory=dict)  # id(attn module) -> vision layer
    prefill: bool = True
    # records, per stage index: list over requests
    kept: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    scores: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    # vision side: per image, original patch indices alive and their owner request
    image_owner: list[int] = field(default_factory=list)
    image_alive: list[torch.Tensor] = field(default_factory=list)
    image_coords: list[torch.Tensor] = field(default_factory=list)  # [P, 3] per image
    image_offset: list[int] = field(default_factory=list)  # first visual index of each image in its request
    # LLM side: [B, S] slot of each current token, validity, original visual index (-1: text/pad)
    seq: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    vis_orig: torch.Tensor | None = None
    coords: list[torch.Tensor] = field(default_factory=list)  # per request [N_vis, 3]
    key_seq: dict[int, torch.Tensor] = field(default_factory=dict)
    key_valid: dict[int, torch.Tensor] = field(default_factory=dict)
    importance: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, Sk]
    next_slot: int = 0
    prefill_index: torch.Tensor | None = None  # [B, S] current tokens' columns in the LLM's prefill input

    # ---- what the attention function is asked for -------------------------------------------
    def query_weights(self, layer: int, query: torch.Tensor) -> torch.Tensor | None:
        """[B, Sq] weights of the queries whose attention a stage before ``layer + 1`` reads, or None.

        "last_query": the last prompt token (always valid: rows are left padded).
        """
        run = self.llm_stages.get(layer + 1) if self.prefill else None
        if run is None or run.pruner.needs is None:
            return None
        if run.pruner.needs != "last_query":
            raise ValueError(f"{run.stage.describe()}: unknown attention need '{run.pruner.needs}'")
        w = torch.zeros(query.shape[0], query.shape[2], device=query.device)
        w[:, -1] = 1.0
        return w

    @property
    def first_pruned_layer(self) -> int | None:
        return min(self.llm_stages) if self.llm_stages else None

    # ---- vision-encoder-layer pre-hook ---------------------------------------------------------
    def before_vision_layer(self, layer: int, hidden: torch.Tensor, prefix: int) -> torch.Tensor:
        """Prune patch tokens of every image before vision layer ``layer``.

        hidden: [n_img, prefix + P, D] (prefix tokens, e.g. CLS, always stay) -> [n_img, prefix + k, D]
        """
        run = self.vision_stages.get(layer)
        if run is None:
            return hidden
        index, kept = [], [[] for _ in range(self.batch_size)]
        for i, alive in enumerate(self.image_alive):
            b = self.image_owner[i]
            sel = self.select(run, run.keep[i], hidden[i, prefix:], self.image_coords[i][alive], None)
            self.image_alive[i] = alive[sel.keep_idx.cpu()]
            kept[b].append(self.image_offset[i] + self.image_alive[i])
            index.append(torch.cat([torch.arange(prefix), prefix + sel.keep_idx.cpu()]))
        self.kept[run.index] = [torch.cat(k) if k else torch.zeros(0, dtype=torch.long) for k in kept]
        self.scores[run.index] = [None] * self.batch_size
        return gather_seq(hidden, torch.stack(index).to(hidden.device))

    # ---- decoder-layer pre-hook ------------------------------------------------------------
    def before_llm_layer(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Prune at a stage layer (prefill), then give layers past the first stage their own mask."""
        first = self.first_pruned_layer
        if first is None or layer < first:
            return hidden
        if self.prefill and layer in self.llm_stages:
            hidden = self._prune_llm(self.llm_stages[layer], layer, hidden)
        if self.prefill and self.prefill_index is not None:
            # every layer receives the model's full-length rotary tables and position ids: cut them down
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (gather_seq(cos, self.prefill_index), gather_seq(sin, self.prefill_index))
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                kwargs["position_ids"] = gather_seq(kwargs["position_ids"], self.prefill_index)
        kwargs["attention_mask"] = self._layer_mask(layer)
        return hidden

    def _layer_mask(self, layer: int) -> torch.Tensor:
        """Boolean SDPA mask [B, 1, Sq, Sk] for this layer's cache after appending the current tokens."""
        if layer in self.key_seq:
            self.key_seq[layer] = torch.cat([self.key_seq[layer], self.seq], dim=1)
            self.key_valid[layer] = torch.cat([self.key_valid[layer], self.valid], dim=1)
        else:
            self.key_seq[layer], self.key_valid[layer] = self.seq, self.valid
        ks, kv = self.key_seq[layer], self.key_valid[layer]
        mask = (ks[:, None, :] <= self.seq[:, :, None]) & kv[:, None, :]
        mask |= ~self.valid[:, :, None]  # padding queries attend everywhere: finite, never read
        return mask[:, None]

    def _prune_llm(self, run: StageRun, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        imp = self.importance.pop(layer - 1, None)  # [B, H, Sk] or None
        keep_slots, kept, scores = [], [], []
        for b in range(self.batch_size):
            vis_slots = (self.vis_orig[b] >= 0).nonzero().flatten()
            orig = self.vis_orig[b, vis_slots]
            attn = imp[b][:, vis_slots] if imp is not None else None
            sel = self.select(run, run.keep[b], hidden[b, vis_slots], self.coords[b][orig.cpu()], attn)
            drop = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
            drop[vis_slots[sel.keep_idx]] = False
            keep_mask = self.valid[b] & ((self.vis_orig[b] < 0) | ~drop)
            keep_slots.append(keep_mask.nonzero().flatten())
            kept.append(orig[sel.keep_idx].cpu())
            scores.append(None if sel.scores is None else sel.scores.detach().float().cpu())
        self.kept[run.index], self.scores[run.index] = kept, scores
        index, valid = left_pad_index(keep_slots, hidden.device)  # [B, S'] each
        self.seq = self.seq.gather(1, index)
        self.vis_orig = torch.where(valid, self.vis_orig.gather(1, index), -1)
        self.valid = valid
        base = self.prefill_index
        self.prefill_index = index if base is None else base.gather(1, index)
        return gather_seq(hidden, index)

    def select(self, run: StageRun, keep: int, tokens, coords, attn) -> Selection:
        inp = StageInput(tokens=tokens, keep=keep, coords=coords, attn=attn, options=run.stage.options, seed=self.seed)
        sel = run.pruner.select(inp)
        check_selection(sel, tokens.shape[0], keep, run.stage.describe())
        return sel

    # ---- decode ------------------------------------------------------------------------------
    def start_decode(self, n_new: int, device) -> None:
        """The next forward carries ``n_new`` fresh tokens per row (all valid)."""
        self.prefill = False
        slots = torch.arange(self.next_slot, self.next_slot + n_new, device=device)
        self.seq = slots.expand(self.batch_size, n_new)
        self.valid = torch.ones(self.batch_size, n_new, dtype=torch.bool, device=device)
        self.vis_orig = torch.full((self.batch_size, n_new), -1, dtype=torch.long, device=device)
        self.next_slot += n_new


def check_selection(sel: Selection, n: int, keep: int, label: str) -> None:
    idx = sel.keep_idx
    if idx.numel() != keep or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
        raise RuntimeError(f"{label}: pruner returned {idx.numel()} indices (want {keep}, sorted, unique)")
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= n):
        raise RuntimeError(f"{label}: pruner returned an index outside [0, {n})")


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


def gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence axis. x: [B, S, ...] or [1, S, ...]; index: [B, S'] -> [B, S', ...]."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


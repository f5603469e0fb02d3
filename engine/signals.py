"""The attention signals pruners read, recorded inside the attention function.

Vision tower (CLIP with a CLS token): the CLS row (single-row kernel / reference), head-mean
keys, value L1 norms, CLS value similarity, or a layer's q/k, only at the layers a stage asked
for. Language model, in layer K-1 of a stage before layer K: the last prompt token's row
(fused kernel on GPU), the same row with RoPE removed, or each text token's row. Every one of
them is O(rows x tokens) in memory; only "all_rows" (AIM's PageRank: every token's row, as the
official code's eager attention) materialises a request's attention matrix, in the layer read.
"""
from __future__ import annotations

import torch

from ..kernels import attention_row
from ..kernels.reference import full_mask


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo rotary embeddings: x [B, H, S, d], cos/sin [B, S, d] (x_rot = x cos + rot(x) sin)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos - rotate_half(x) * sin


class SignalsMixin:
    """Methods of RequestState that record and hand out attention signals."""

    # ---- language model ---------------------------------------------------------------------
    def llm_need(self, layer: int) -> str | None:
        """What the stage before ``layer + 1`` needs from this layer's attention (prefill only)."""
        run = self.llm_stages.get(layer + 1) if self.prefill else None
        if run is None:
            return None
        if run.pruner.needs == "last_query" and run.stage.options.get("scoring") == "eager":
            return "last_query_eager"
        return run.pruner.needs

    def last_query_weights(self, query: torch.Tensor) -> torch.Tensor:
        """[B, Sq] one-hot on the last prompt token (always valid: rows are left padded)."""
        w = torch.zeros(query.shape[0], query.shape[2], device=query.device)
        w[:, -1] = 1.0
        return w

    def record_rows(self, need: str, layer: int, query, key, mask, causal: bool, scale: float) -> None:
        """Exact softmax rows for 'last_query_norope' ([B, H, Sk]), 'text_rows' (per request [H, T, Sk]) or
        'all_rows' (per request [H, S_valid, Sk]: every valid slot's row)."""
        rep = query.shape[1] // key.shape[1]
        if need == "last_query_norope":
            cos, sin = self.rope
            q = unrotate(query[:, :, -1:], cos[:, -1:], sin[:, -1:])
            k = unrotate(key, cos, sin)
            rows = [query.shape[2] - 1]
        elif need in ("text_rows", "all_rows"):
            q, k = query, key
            rows = None
        else:
            raise ValueError(f"unknown attention need '{need}'")
        b, hq, sq, _ = query.shape
        sk = key.shape[2]
        out = []
        for i in range(b):
            if rows is None:
                own = self.text_rows(i) if need == "text_rows" else self.valid[i].nonzero().flatten()
            r = torch.tensor(rows if rows is not None else own.tolist(), device=query.device, dtype=torch.long)
            qi = q[i:i + 1] if need == "last_query_norope" else q[i:i + 1, :, r]
            logits = (qi.float() @ k[i:i + 1].float().repeat_interleave(rep, 1).transpose(-1, -2)) * scale
            allowed = full_mask(1, hq, sq, sk, causal, None if mask is None else mask[i:i + 1], r, query.device)
            out.append(logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)[0])  # [H, R, Sk]
        self.importance[layer] = torch.stack([o[:, 0] for o in out]) if need == "last_query_norope" else out

    def text_rows(self, b: int) -> torch.Tensor:
        """Slots of request b's text tokens after its last visual token (the question and template)."""
        vis = (self.vis_orig[b] >= 0).nonzero().flatten()
        start = int(vis[-1]) + 1 if vis.numel() else 0
        slots = torch.arange(start, self.vis_orig.shape[1], device=self.vis_orig.device)
        return slots[self.valid[b, start:]]

    def llm_signals(self, run, imp, b: int, vis_slots: torch.Tensor) -> dict:
        """The pruner's inputs for request b from the recorded rows, restricted to its visual tokens."""
        if imp is None:
            return {}
        if run.pruner.needs == "text_rows":
            raters = self.raters.get(run.index)
            return {"text_attn": imp[b][:, :, vis_slots], "raters": None if raters is None else raters[b]}
        if run.pruner.needs == "all_rows":  # rows are the valid slots in order: take the same key columns
            valid = self.valid[b].nonzero().flatten()
            return {"seq_attn": imp[b][:, :, valid], "seq_vis": torch.searchsorted(valid, vis_slots)}
        return {"attn": imp[b][:, vis_slots]}

    def pick_raters(self, hidden: torch.Tensor) -> None:
        """Before decoder layer 0 (prefill), hidden [B, S, D] = the LLM's input embeddings: the text raters
        of every request for each LLM stage whose pruner picks them (``Pruner.picks_raters``)."""
        for run in self.llm_stages.values():
            if run.pruner.picks_raters:
                self.raters[run.index] = [run.pruner.text_raters(hidden[b, self.vis_orig[b] >= 0],
                                                                 hidden[b, self.text_rows(b)])
                                          for b in range(self.batch_size)]

    # ---- vision tower -----------------------------------------------------------------------
    def record_vision(self, layer: int, query, key, value, scale: float) -> None:
        """query/key/value [n, H, S, d] of vision layer ``layer``: record what the stages asked for."""
        want = self.tower_wants.get(layer, ())
        rec = self.tower
        if "cls" in want:
            rec.cls[layer], _ = attention_row(query[:, :, 0], key, scale=scale)
        if "keys" in want:
            rec.keys[layer] = key.float().mean(1)
        if "values" in want:  # FlowCut's value signals: [n, H, S] and [n, S]
            v = value.float()
            rec.value_attn[layer] = (v[:, :, :1] @ v.transpose(-1, -2))[:, :, 0].softmax(-1)
            rec.value_l1[layer] = v.mean(1).abs().sum(-1)
        if "qk" in want:
            rec.qk[layer] = (query.detach(), key.detach())

    def tower_signals(self, run, layers: list[int] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(tower_score [n, S - prefix], keys [n, S - prefix, d]) of a stage (from ``layers``, default all its
        tower layers), or Nones where not recorded."""
        layers = run.tower_layers if layers is None else layers
        if not layers or self.tower is None:
            return None, None
        needs = run.pruner.vision_needs
        score = run.pruner.tower_score(self.tower, layers) if needs - {"keys"} else None
        keys = self.tower.keys[layers[-1]][:, self.tower.prefix:] if "keys" in needs else None
        return score, keys

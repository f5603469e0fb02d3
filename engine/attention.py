"""The ``tokensieve`` attention function, registered through transformers' AttentionInterface.

It computes the output exactly as transformers' SDPA path does (it *is* that function), and
on the layers a pruner scores it also computes the few softmax rows that pruner needs
(e.g. the last query against all keys): memory O(rows x keys), never O(keys^2), and no
eager attention anywhere. The fused Triton kernel (kernels/) plugs in at ``score_rows``.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .state import STATE_KWARG

ATTN_NAME = "tokensieve"


def register() -> str:
    """Register the attention function and its mask function (same masks as SDPA). Idempotent."""
    AttentionInterface.register(ATTN_NAME, tokensieve_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


def tokensieve_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D] -> (out [B, Sq, Hq, D], None)."""
    state = kwargs.pop(STATE_KWARG, None)
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = getattr(module, "layer_idx", None)
    if state is not None and layer is not None and state.rows_wanted(layer) == "last_query":
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        mask_row = None if attention_mask is None else attention_mask[:, :, -1:, :]
        state.attn_rows[layer] = score_rows(query[:, :, -1:], key, mask_row, scale)
    return out, None


def score_rows(q_rows: torch.Tensor, key: torch.Tensor, mask_rows: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Softmax attention of a few query rows over all keys.

    q_rows: [B, Hq, R, D]; key: [B, Hkv, Sk, D] (Hq a multiple of Hkv);
    mask_rows: None, bool [B, 1|Hq, R, Sk] (True = attend) or additive float.
    Returns [B, Hq, R, Sk] fp32.
    """
    b, hq, r, d = q_rows.shape
    hkv = key.shape[1]
    q = q_rows.float().view(b, hkv, hq // hkv * r, d)  # group query heads onto their kv head
    logits = (q @ key.float().transpose(-1, -2)).view(b, hq, r, -1) * scale
    if mask_rows is not None:
        if mask_rows.dtype == torch.bool:
            logits = logits.masked_fill(~mask_rows, float("-inf"))
        else:
            logits = logits + mask_rows.float()
    return torch.softmax(logits, dim=-1)

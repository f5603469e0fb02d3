"""The ``tokensieve`` attention function, registered through transformers' AttentionInterface.

Every layer's output is computed by transformers' own SDPA path (it *is* that function), except
on the layers a pruner scores: there the importance each key receives from the pruner's query
rows (e.g. the last prompt token) is computed too, without eager attention:
    on CUDA   the fused Triton kernel returns output, LSE and importance in one call (also on
              CPU under TRITON_INTERPRET=1, which is how the tests exercise this path);
    elsewhere SDPA for the output, plus the exact softmax rows of the weighted queries only
              (kernels.reference.importance_ref): memory O(rows x keys), never O(keys^2).
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..kernels import attention_with_importance, importance_ref, triton_usable
from .state import STATE_KWARG

ATTN_NAME = "tokensieve"


def register() -> str:
    """Register the attention function and its mask function (same masks as SDPA). Idempotent."""
    AttentionInterface.register(ATTN_NAME, tokensieve_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


def _bool_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2  # additive float mask -> allowed


def tokensieve_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D] -> (out [B, Sq, Hq, D], None)."""
    state = kwargs.pop(STATE_KWARG, None)
    layer = getattr(module, "layer_idx", None)
    weights = state.query_weights(layer, query) if state is not None and layer is not None else None
    if weights is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = _bool_mask(attention_mask)
    causal = mask is None and getattr(module, "is_causal", True) and query.shape[2] > 1
    if triton_usable(query) and not module.training:  # CUDA, or the Triton interpreter (tests)
        out, _, imp = attention_with_importance(query, key, value, scale=scale, causal=causal, attn_mask=mask,
                                                query_weights=weights)
    else:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                        **kwargs)
        imp = importance_ref(query, key, scale=scale, causal=causal, attn_mask=mask, query_weights=weights)
    state.importance[layer] = imp  # [B, Hq, Sk]
    return out, None

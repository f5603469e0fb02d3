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


def eager_attention(query, key, value, mask, causal: bool, scale: float):
    """Attention with its probabilities materialised, as ``output_attentions=True`` does:
    (out [B, Sq, Hq, D], probs [B, Hq, Sq, Sk] in the query's dtype)."""
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = (query @ key.transpose(-1, -2)) * scale
    sq, sk = query.shape[2], key.shape[2]
    if mask is not None:
        scores = scores.masked_fill(~mask[..., :sk], float("-inf"))
    elif causal:
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=query.device).triu(sk - sq + 1),
                                    float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).nan_to_num(0.0).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def tokensieve_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D] -> (out [B, Sq, Hq, D], None)."""
    state = kwargs.pop(STATE_KWARG, None)
    sdpa = lambda: sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,  # noqa: E731
                                          dropout=dropout, **kwargs)
    if state is None:
        return sdpa()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    vision_layer = state.vision_layer_of.get(id(module))
    if vision_layer is not None:
        state.record_vision(vision_layer, query, key, value, scale)
        return sdpa()
    layer = getattr(module, "layer_idx", None)
    if layer is not None:
        state.record_keys(layer, query, key)  # only where a stage at layer + 1 reads ``llm.keys``
    need = state.llm_need(layer) if layer is not None else None
    if need is None:
        return sdpa()
    mask = _bool_mask(attention_mask)
    causal = mask is None and getattr(module, "is_causal", True) and query.shape[2] > 1
    if need == "last_query_eager":  # the peers' way: the whole attention matrix, then its last row
        out, probs = eager_attention(query, key, value, mask, causal, scale)
        state.importance[layer] = (probs * state.last_query_weights(query)[:, None, :, None]).sum(2)  # [B, Hq, Sk]
        return out, None
    if need != "last_query":
        out, _ = sdpa()
        state.record_rows(need, layer, query, key, mask, causal, scale)
        return out, None
    weights = state.last_query_weights(query)
    if triton_usable(query) and not module.training:  # CUDA, or the Triton interpreter (tests)
        out, _, imp = attention_with_importance(query, key, value, scale=scale, causal=causal, attn_mask=mask,
                                                query_weights=weights)
    else:
        out, _ = sdpa()
        imp = importance_ref(query, key, scale=scale, causal=causal, attn_mask=mask, query_weights=weights)
    state.importance[layer] = imp  # [B, Hq, Sk]
    return out, None

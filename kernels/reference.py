"""Plain-PyTorch references for the fused kernels; also the CPU path.

Conventions (shared with kernels/attention.py):
    q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D], Hq a multiple of Hkv (grouped-query attention)
    causal: query i sees key j iff j <= i + (Sk - Sq)   (aligned bottom-right, as FlashAttention)
    attn_mask: bool, True = attend; [B, Sk] (key padding) or [B, 1|Hq, Sq, Sk]
    query_weights: [B, Sq] (None = every query weighs 1)
Returns out [B, Sq, Hq, D] (q's dtype), lse [B, Hq, Sq] fp32 (natural log; -inf for a row that
sees no key) and importance [B, Hq, Sk] fp32, importance[b, h, j] = sum_i w[b, i] softmax_i[j].

Memory stays O(chunk x Sk): queries are processed in chunks, and the importance only reads
the rows whose weight is non-zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 256


def full_mask(b: int, hq: int, sq: int, sk: int, causal: bool, attn_mask, rows: torch.Tensor | None = None, device=None):
    """Boolean mask [B, 1|Hq, R, Sk] (True = attend) for query rows ``rows`` (all when None)."""
    rows = torch.arange(sq, device=device) if rows is None else rows
    allowed = torch.ones(1, 1, rows.numel(), sk, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (torch.arange(sk, device=device)[None, :] <= rows[:, None] + (sk - sq))[None, None]
    if attn_mask is not None:
        m = attn_mask.bool()
        m = m[:, None, None, :] if m.dim() == 2 else m[:, :, rows]
        allowed = allowed & m
    return allowed.expand(b, -1, -1, -1)


def _scores(q, k, scale):
    """q [B, Hq, R, D], k [B, Hkv, Sk, D] -> fp32 scores [B, Hq, R, Sk]."""
    rep = q.shape[1] // k.shape[1]
    return (q.float() @ k.float().repeat_interleave(rep, 1).transpose(-1, -2)) * scale


def attention_with_importance_ref(q, k, v, *, scale=None, causal=False, attn_mask=None, query_weights=None):
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    rep = hq // k.shape[1]
    out = torch.empty(b, sq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    for s in range(0, sq, CHUNK):
        rows = torch.arange(s, min(s + CHUNK, sq), device=q.device)
        allowed = full_mask(b, hq, sq, sk, causal, attn_mask, rows, q.device)
        scores = _scores(q[:, :, rows], k, scale).masked_fill(~allowed, float("-inf"))
        lse[:, :, rows] = torch.logsumexp(scores, dim=-1)
        o = F.scaled_dot_product_attention(q[:, :, rows].float(), kr.float(), vr.float(), attn_mask=allowed, scale=scale)
        o = torch.where(allowed.any(-1, keepdim=True), o, 0.0)  # rows that see nothing: 0, as the kernel
        out[:, rows] = o.transpose(1, 2).to(q.dtype)
    imp = importance_ref(q, k, scale=scale, causal=causal, attn_mask=attn_mask, query_weights=query_weights)
    return out, lse, imp


def importance_ref(q, k, *, scale=None, causal=False, attn_mask=None, query_weights=None):
    """importance [B, Hq, Sk] fp32 from the exact softmax rows of the weighted queries only."""
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    w = torch.ones(b, sq, device=q.device) if query_weights is None else query_weights.float()
    imp = torch.zeros(b, hq, sk, dtype=torch.float32, device=q.device)
    rows_all = (w != 0).any(0).nonzero().flatten()  # rows that carry weight in some request
    for s in range(0, rows_all.numel(), CHUNK):
        rows = rows_all[s:s + CHUNK]
        allowed = full_mask(b, hq, sq, sk, causal, attn_mask, rows, q.device)
        probs = _scores(q[:, :, rows], k, scale).masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        imp += torch.einsum("bhrk,br->bhk", probs, w[:, rows])
    return imp


def attention_row_ref(q_row, k, *, scale=None, key_mask=None):
    """One query per (batch, head), no causal mask: q_row [B, Hq, D] -> (probs [B, Hq, Sk], lse [B, Hq]) fp32."""
    scale = q_row.shape[-1] ** -0.5 if scale is None else scale
    s = _scores(q_row[:, :, None], k, scale)[:, :, 0]
    if key_mask is not None:
        s = s.masked_fill(~key_mask.bool()[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (s - lse[..., None]).exp().nan_to_num(0.0), lse

"""FlashAttention-style Triton kernels that return token importance alongside the output.

    out, lse, importance = attention_with_importance(q, k, v, causal=True, query_weights=w)

Pass 1 (``_fwd_kernel``) is the usual online-softmax forward writing O and the log-sum-exp.
Pass 2 turns the LSE into exact probabilities without storing them:
    ``_importance_qmajor_kernel``: one program per query block; blocks whose weights are all
        zero return at once (weights on the last 64 queries cost one block row); atomics add
        each block's column sums into importance.
    ``_importance_kmajor_kernel``: one program per key block looping over every query block:
        no atomics, deterministic; used when most queries carry weight (or weights are None).
``_row_kernel`` is the single-row variant (a CLS query in a vision tower, no causal mask).

Layers: private ``@triton.jit`` kernels -> launchers that check shapes, strides and dtypes ->
public ops registered with ``torch.library.custom_op`` (+ fake implementations). The
plain-PyTorch references live in kernels/reference.py. Conventions are documented there.
"""
from __future__ import annotations

import os

import torch

from .reference import attention_row_ref, attention_with_importance_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path still works
    triton = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(t: torch.Tensor) -> bool:
    """True where the Triton kernels can run on ``t``: a CUDA tensor, or any tensor under TRITON_INTERPRET=1."""
    return triton is not None and (t.is_cuda or interpreting())


if triton is not None:

    @triton.jit
    def _load_allowed(MASK, b, h, rows, cols, Sq, Sk, causal_offset, smb, smh, smq, smk,
                      IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
        ok = (rows[:, None] < Sq) & (cols[None, :] < Sk)
        if IS_CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + causal_offset)
        if HAS_MASK:
            m = tl.load(MASK + b * smb + h * smh + rows[:, None] * smq + cols[None, :] * smk, mask=ok, other=0)
            ok = ok & (m != 0)
        return ok

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, MASK,
                    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                    sob, sos, soh, sod, slb, slh, sls, smb, smh, smq, smk,
                    Hq, Sq, Sk, n_rep, scale_log2, causal_offset,
                    D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        hk = h // n_rep
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        dmask = dims < D
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :] * sqd,
                    mask=(rows[:, None] < Sq) & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = Sk
        if IS_CAUSAL:
            hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M + causal_offset)
        for start in range(0, hi, BLOCK_N):
            cols = start + offs_n
            kt = tl.load(K + b * skb + hk * skh + cols[None, :] * sks + dims[:, None] * skd,
                         mask=(cols[None, :] < Sk) & dmask[:, None], other=0.0)
            s = tl.dot(q, kt) * scale_log2
            ok = _load_allowed(MASK, b, h, rows, cols, Sq, Sk, causal_offset, smb, smh, smq, smk, IS_CAUSAL, HAS_MASK)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + hk * svh + cols[:, None] * svs + dims[None, :] * svd,
                        mask=(cols[:, None] < Sk) & dmask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(O + b * sob + rows[:, None] * sos + h * soh + dims[None, :] * sod, out.to(O.dtype.element_ty),
                 mask=(rows[:, None] < Sq) & dmask[None, :])
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + b * slb + h * slh + rows * sls, lse, mask=rows < Sq)

    @triton.jit
    def _probs_block(q, K, b, hk, h, rows, cols, dims, dmask, lse2, MASK, Sq, Sk, causal_offset,
                     skb, skh, sks, skd, smb, smh, smq, smk, scale_log2,
                     IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
        """Exact softmax probabilities of a [BLOCK_M, BLOCK_N] tile, from the row LSEs."""
        kt = tl.load(K + b * skb + hk * skh + cols[None, :] * sks + dims[:, None] * skd,
                     mask=(cols[None, :] < Sk) & dmask[:, None], other=0.0)
        s = tl.dot(q, kt) * scale_log2
        ok = _load_allowed(MASK, b, h, rows, cols, Sq, Sk, causal_offset, smb, smh, smq, smk, IS_CAUSAL, HAS_MASK)
        ok = ok & (lse2[:, None] > float("-inf"))
        return tl.where(ok, tl.exp2(s - tl.where(ok, lse2[:, None], 0.0)), 0.0)

    @triton.jit
    def _importance_qmajor_kernel(Q, K, LSE, W, IMP, MASK,
                                  sqb, sqh, sqs, sqd, skb, skh, sks, skd, slb, slh, sls, swb, sws,
                                  sib, sih, sik, smb, smh, smq, smk,
                                  Hq, Sq, Sk, n_rep, scale_log2, causal_offset,
                                  D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        hk = h // n_rep
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        w = tl.load(W + b * swb + rows * sws, mask=rows < Sq, other=0.0)
        if tl.max(tl.abs(w), 0) == 0:
            return
        dims = tl.arange(0, BLOCK_D)
        dmask = dims < D
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :] * sqd,
                    mask=(rows[:, None] < Sq) & dmask[None, :], other=0.0)
        lse2 = tl.load(LSE + b * slb + h * slh + rows * sls, mask=rows < Sq, other=float("-inf")) * 1.4426950408889634
        hi = Sk
        if IS_CAUSAL:
            hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M + causal_offset)
        for start in range(0, hi, BLOCK_N):
            cols = start + offs_n
            p = _probs_block(q, K, b, hk, h, rows, cols, dims, dmask, lse2, MASK, Sq, Sk, causal_offset,
                             skb, skh, sks, skd, smb, smh, smq, smk, scale_log2, IS_CAUSAL, HAS_MASK)
            tl.atomic_add(IMP + b * sib + h * sih + cols * sik, tl.sum(p * w[:, None], 0), mask=cols < Sk)

    @triton.jit
    def _importance_kmajor_kernel(Q, K, LSE, W, IMP, MASK,
                                  sqb, sqh, sqs, sqd, skb, skh, sks, skd, slb, slh, sls, swb, sws,
                                  sib, sih, sik, smb, smh, smq, smk,
                                  Hq, Sq, Sk, n_rep, scale_log2, causal_offset,
                                  D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        hk = h // n_rep
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        dmask = dims < D
        offs_m = tl.arange(0, BLOCK_M)
        acc = tl.zeros([BLOCK_N], tl.float32)
        lo = 0
        if IS_CAUSAL:  # queries before (first key - offset) see none of this block
            lo = tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
        for start in range(lo, Sq, BLOCK_M):
            rows = start + offs_m
            q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :] * sqd,
                        mask=(rows[:, None] < Sq) & dmask[None, :], other=0.0)
            lse2 = tl.load(LSE + b * slb + h * slh + rows * sls, mask=rows < Sq, other=float("-inf")) * 1.4426950408889634
            p = _probs_block(q, K, b, hk, h, rows, cols, dims, dmask, lse2, MASK, Sq, Sk, causal_offset,
                             skb, skh, sks, skd, smb, smh, smq, smk, scale_log2, IS_CAUSAL, HAS_MASK)
            if HAS_W:
                w = tl.load(W + b * swb + rows * sws, mask=rows < Sq, other=0.0)
                p = p * w[:, None]
            acc += tl.sum(p, 0)
        tl.store(IMP + b * sib + h * sih + cols * sik, acc, mask=cols < Sk)

    @triton.jit
    def _row_kernel(Q, K, P, LSE, KMASK, sqb, sqh, sqd, skb, skh, sks, skd, spb, sph, spk, slb, slh, smb, smk,
                    Hq, Sk, n_rep, scale_log2,
                    D: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // Hq
        h = bh % Hq
        hk = h // n_rep
        dims = tl.arange(0, BLOCK_D)
        dmask = dims < D
        q = tl.load(Q + b * sqb + h * sqh + dims * sqd, mask=dmask, other=0.0).to(tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, Sk, BLOCK_N):  # pass 1: per-lane running max and sum
            cols = start + offs_n
            s = _row_scores(q, K, b, hk, cols, dims, dmask, KMASK, Sk, skb, skh, sks, skd, smb, smk, scale_log2, HAS_MASK)
            m_new = tl.maximum(m, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2(m - m_safe) + tl.exp2(s - m_safe)
            m = m_new
        m_all = tl.max(m, 0)
        m_all_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        l_all = tl.sum(l * tl.exp2(tl.where(m == float("-inf"), float("-inf"), m - m_all_safe)), 0)
        lse2 = tl.where(l_all > 0, m_all_safe + tl.log2(tl.where(l_all > 0, l_all, 1.0)), float("-inf"))
        tl.store(LSE + b * slb + h * slh, lse2 * 0.6931471805599453)
        for start in range(0, Sk, BLOCK_N):  # pass 2: probabilities
            cols = start + offs_n
            s = _row_scores(q, K, b, hk, cols, dims, dmask, KMASK, Sk, skb, skh, sks, skd, smb, smk, scale_log2, HAS_MASK)
            p = tl.where(s > float("-inf"), tl.exp2(s - tl.where(l_all > 0, lse2, 0.0)), 0.0)
            tl.store(P + b * spb + h * sph + cols * spk, p, mask=cols < Sk)

    @triton.jit
    def _row_scores(q, K, b, hk, cols, dims, dmask, KMASK, Sk, skb, skh, sks, skd, smb, smk, scale_log2,
                    HAS_MASK: tl.constexpr):
        k = tl.load(K + b * skb + hk * skh + cols[:, None] * sks + dims[None, :] * skd,
                    mask=(cols[:, None] < Sk) & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1) * scale_log2
        ok = cols < Sk
        if HAS_MASK:
            ok = ok & (tl.load(KMASK + b * smb + cols * smk, mask=cols < Sk, other=0) != 0)
        return tl.where(ok, s, float("-inf"))


# ---- launchers --------------------------------------------------------------------------------

def _blocks(d: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages): small blocks when interpreting."""
    block_d = max(16, triton.next_power_of_2(d))
    if device.type != "cuda":
        return 16, 16, block_d, 1, 1
    if block_d <= 64:
        return 128, 64, block_d, 4, 3
    return 128, 64, block_d, 8, 2


def _check(q, k, v, attn_mask, query_weights):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, sq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must be [B={b}, Hkv, Sk, D={d}] and equal; got {tuple(k.shape)}, {tuple(v.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError("q, k, v must be on one device")
    if d > 256:
        raise ValueError(f"head dim {d} > 256 is not supported")
    sk = k.shape[2]
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask must be bool (True = attend), got {attn_mask.dtype}")
        ok2 = attn_mask.dim() == 2 and tuple(attn_mask.shape) == (b, sk)
        ok4 = attn_mask.dim() == 4 and attn_mask.shape[0] == b and attn_mask.shape[1] in (1, hq) \
            and tuple(attn_mask.shape[2:]) == (sq, sk)
        if not (ok2 or ok4):
            raise ValueError(f"attn_mask must be [B, Sk]=[{b}, {sk}] or [B, 1|Hq, Sq, Sk]; got {tuple(attn_mask.shape)}")
    if query_weights is not None and tuple(query_weights.shape) != (b, sq):
        raise ValueError(f"query_weights must be [B, Sq]=[{b}, {sq}]; got {tuple(query_weights.shape)}")


def _mask_args(attn_mask, q):
    """(tensor, strides b, h, q, k) of a mask broadcast to [B, H, Sq, Sk] (dummy when None)."""
    if attn_mask is None:
        return torch.empty(1, dtype=torch.int8, device=q.device), (0, 0, 0, 0)
    m = attn_mask.to(torch.int8)
    if m.dim() == 2:
        return m, (m.stride(0), 0, 0, m.stride(1))
    return m, (m.stride(0), m.stride(1) if m.shape[1] > 1 else 0, m.stride(2), m.stride(3))


def _launch(q, k, v, scale, causal, attn_mask, query_weights, key_major):
    _check(q, k, v, attn_mask, query_weights)
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    n_rep = hq // k.shape[1]
    bm, bn, bd, warps, stages = _blocks(d, q.device)
    out = torch.empty(b, sq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    imp = torch.zeros(b, hq, sk, dtype=torch.float32, device=q.device)
    mask, ms = _mask_args(attn_mask, q)
    scale_log2 = scale * LOG2E
    common = dict(D=d, IS_CAUSAL=causal, HAS_MASK=attn_mask is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                  num_warps=warps, num_stages=stages)
    _fwd_kernel[(triton.cdiv(sq, bm), b * hq)](
        q, k, v, out, lse, mask, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *ms,
        hq, sq, sk, n_rep, scale_log2, sk - sq, **common)
    w = query_weights.float().contiguous() if query_weights is not None else torch.ones(1, device=q.device)
    ws = (w.stride(0), w.stride(1)) if query_weights is not None else (0, 0)
    args = (q, k, lse, w, imp, mask, *q.stride(), *k.stride(), *lse.stride(), *ws, *imp.stride(), *ms,
            hq, sq, sk, n_rep, scale_log2, sk - sq)
    if key_major:
        _importance_kmajor_kernel[(triton.cdiv(sk, bn), b * hq)](*args, HAS_W=query_weights is not None, **common)
    else:
        if query_weights is None:
            w = torch.ones(b, sq, device=q.device)
            args = (q, k, lse, w, imp, mask, *q.stride(), *k.stride(), *lse.stride(), *w.stride(), *imp.stride(), *ms,
                    hq, sq, sk, n_rep, scale_log2, sk - sq)
        _importance_qmajor_kernel[(triton.cdiv(sq, bm), b * hq)](*args, **common)
    return out, lse, imp


def _launch_row(q_row, k, scale, key_mask):
    if q_row.dim() != 3 or k.dim() != 4 or q_row.shape[0] != k.shape[0] or q_row.shape[2] != k.shape[3]:
        raise ValueError(f"q_row must be [B, Hq, D] and k [B, Hkv, Sk, D]; got {tuple(q_row.shape)}, {tuple(k.shape)}")
    if q_row.shape[1] % k.shape[1] or q_row.dtype != k.dtype or q_row.dtype not in DTYPES:
        raise ValueError(f"bad heads/dtypes: q_row {tuple(q_row.shape)} {q_row.dtype}, k {tuple(k.shape)} {k.dtype}")
    b, hq, d = q_row.shape
    sk = k.shape[2]
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (b, sk)):
        raise ValueError(f"key_mask must be bool [B, Sk]=[{b}, {sk}]; got {key_mask.dtype} {tuple(key_mask.shape)}")
    probs = torch.empty(b, hq, sk, dtype=torch.float32, device=q_row.device)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q_row.device)
    km = key_mask.to(torch.int8) if key_mask is not None else torch.empty(1, dtype=torch.int8, device=q_row.device)
    kms = (km.stride(0), km.stride(1)) if key_mask is not None else (0, 0)
    _, bn, bd, warps, _ = _blocks(d, q_row.device)
    _row_kernel[(b * hq,)](q_row, k, probs, lse, km, *q_row.stride(), *k.stride(), *probs.stride(), *lse.stride(), *kms,
                           hq, sk, hq // k.shape[1], scale * LOG2E, D=d, HAS_MASK=key_mask is not None,
                           BLOCK_N=bn if q_row.is_cuda else 16, BLOCK_D=bd, num_warps=warps)
    return probs, lse


# ---- public ops -------------------------------------------------------------------------------

@torch.library.custom_op("tokensieve::attention_with_importance", mutates_args=())
def _attention_with_importance_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                                  attn_mask: torch.Tensor | None, query_weights: torch.Tensor | None,
                                  key_major: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(q, k, v, scale, causal, attn_mask, query_weights, key_major)


@_attention_with_importance_op.register_fake
def _(q, k, v, scale, causal, attn_mask, query_weights, key_major):
    b, hq, sq, d = q.shape
    return (q.new_empty(b, sq, hq, d), q.new_empty(b, hq, sq, dtype=torch.float32),
            q.new_empty(b, hq, k.shape[2], dtype=torch.float32))


@torch.library.custom_op("tokensieve::attention_row", mutates_args=())
def _attention_row_op(q_row: torch.Tensor, k: torch.Tensor, scale: float,
                      key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_row(q_row, k, scale, key_mask)


@_attention_row_op.register_fake
def _(q_row, k, scale, key_mask):
    return q_row.new_empty(*q_row.shape[:2], k.shape[2], dtype=torch.float32), q_row.new_empty(q_row.shape[:2], dtype=torch.float32)


def _dense(query_weights, sq) -> bool:
    """Key-major pays off when most query blocks carry weight."""
    return query_weights is None or (sq > 1 and bool((query_weights != 0).float().mean() > 0.5))


def attention_with_importance(q, k, v, *, scale=None, causal=False, attn_mask=None, query_weights=None,
                              key_major: bool | None = None, use_triton: bool | None = None):
    """Attention output plus the importance each key receives from the weighted queries.

    q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D]; returns (out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32,
    importance [B, Hq, Sk] fp32). Conventions in kernels/reference.py. Runs the Triton kernels on
    CUDA (or under TRITON_INTERPRET=1), the plain-PyTorch reference otherwise.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    use_triton = triton_usable(q) if use_triton is None else use_triton
    if not use_triton:
        _check(q, k, v, attn_mask, query_weights)
        return attention_with_importance_ref(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask,
                                             query_weights=query_weights)
    key_major = _dense(query_weights, q.shape[2]) if key_major is None else key_major
    return _attention_with_importance_op(q, k, v, scale, bool(causal), attn_mask, query_weights, key_major)


def attention_row(q_row, k, *, scale=None, key_mask=None, use_triton: bool | None = None):
    """Softmax attention of one query per (batch, head) over all keys, no causal mask (a CLS row).

    q_row [B, Hq, D], k [B, Hkv, Sk, D], key_mask bool [B, Sk] -> (probs [B, Hq, Sk], lse [B, Hq]) fp32.
    """
    scale = q_row.shape[-1] ** -0.5 if scale is None else float(scale)
    if not (triton_usable(q_row) if use_triton is None else use_triton):
        return attention_row_ref(q_row, k, scale=scale, key_mask=key_mask)
    return _attention_row_op(q_row, k, scale, key_mask)


__all__ = ["attention_with_importance", "attention_row", "triton_usable"]

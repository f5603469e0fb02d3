"""Triton kernels vs the plain-PyTorch reference (and the reference vs eager softmax written here).

On CPU the kernels run in the Triton interpreter: TRITON_INTERPRET=1 must be set before Triton
compiles anything, so these tests run the kernels in a subprocess when it is not set. The
subprocesses run from tests/, never from the repository root, where the folder ``kernels/``
would shadow the Hugging Face ``kernels`` package that transformers probes for. On a GPU
machine they run natively. Tolerances: fp32 1e-4, fp16 2e-2 (relative to magnitudes ~1).
"""
import os
import subprocess
import sys

import pytest
import torch

from tokensieve.kernels import attention_row_ref, attention_with_importance_ref

ON_GPU = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def _eager(q, k, v, scale, causal, mask, w):
    """Full softmax matrix, written out: the definition the reference must match."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    s = q.float() @ k.transpose(-1, -2) * scale
    sq, sk = s.shape[-2:]
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        ok = torch.arange(sk)[None] <= torch.arange(sq)[:, None] + (sk - sq)
    ok = ok[None, None].expand(s.shape).clone()
    if mask is not None:
        ok &= mask[:, None, None] if mask.dim() == 2 else mask
    p = s.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0)
    w = torch.ones(q.shape[0], sq) if w is None else w
    return (p @ v).transpose(1, 2), torch.einsum("bhqk,bq->bhk", p, w.float())


CASES = {
    "plain": dict(b=2, hq=2, hkv=2, sq=20, sk=20, d=16, causal=False, mask=None, w=None),
    "causal_gqa": dict(b=1, hq=4, hkv=2, sq=33, sk=33, d=16, causal=True, mask=None, w="last"),
    "sq_lt_sk": dict(b=2, hq=2, hkv=1, sq=5, sk=40, d=8, causal=True, mask=None, w="some"),
    "key_padding": dict(b=2, hq=2, hkv=2, sq=17, sk=17, d=32, causal=True, mask="pad", w="all"),
    "mask_4d": dict(b=1, hq=2, hkv=2, sq=9, sk=24, d=16, causal=False, mask="4d", w="some"),
}


def make_case(c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(c["b"], c["hq"], c["sq"], c["d"], generator=g).to(dtype)
    k = torch.randn(c["b"], c["hkv"], c["sk"], c["d"], generator=g).to(dtype)
    v = torch.randn(c["b"], c["hkv"], c["sk"], c["d"], generator=g).to(dtype)
    mask = None
    if c["mask"] == "pad":
        mask = torch.ones(c["b"], c["sk"], dtype=torch.bool)
        mask[1, :6] = False  # left padding in row 1
    elif c["mask"] == "4d":
        mask = torch.rand(c["b"], 1, c["sq"], c["sk"], generator=g) > 0.3
    w = {None: None, "all": torch.ones(c["b"], c["sq"]), "last": torch.zeros(c["b"], c["sq"]).index_fill(1, torch.tensor([c["sq"] - 1]), 1.0),
         "some": (torch.rand(c["b"], c["sq"], generator=g) > 0.5).float() * torch.rand(c["b"], c["sq"], generator=g)}[c["w"]]
    return q, k, v, mask, w


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_eager(name):
    c = CASES[name]
    q, k, v, mask, w = make_case(c, torch.float32)
    out, lse, imp = attention_with_importance_ref(q, k, v, scale=0.3, causal=c["causal"], attn_mask=mask, query_weights=w)
    ref_out, ref_imp = _eager(q, k, v, 0.3, c["causal"], mask, w)
    torch.testing.assert_close(out.float(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(imp, ref_imp, atol=1e-5, rtol=1e-5)
    assert lse.shape == (c["b"], c["hq"], c["sq"])


def _triton_checks():
    from tokensieve.kernels import attention_row, attention_with_importance
    dev = "cuda" if ON_GPU else "cpu"
    for name, c in CASES.items():
        for dtype, tol in [(torch.float32, 1e-4), (torch.float16, 2e-2)] + ([(torch.bfloat16, 3e-2)] if ON_GPU else []):
            q, k, v, mask, w = make_case(c, dtype, seed=1)
            ref = attention_with_importance_ref(q.float(), k.float(), v.float(), scale=0.25, causal=c["causal"],
                                                attn_mask=mask, query_weights=w)
            for key_major in (False, True):
                got = attention_with_importance(q.to(dev), k.to(dev), v.to(dev), scale=0.25, causal=c["causal"],
                                                attn_mask=None if mask is None else mask.to(dev),
                                                query_weights=None if w is None else w.to(dev), key_major=key_major,
                                                use_triton=True)
                for label, a, r in zip(["out", "lse", "importance"], got, ref):
                    a, r = a.float().cpu(), r.float()
                    finite = torch.isfinite(r)
                    assert torch.equal(finite, torch.isfinite(a)), (name, dtype, label)
                    torch.testing.assert_close(a[finite], r[finite], atol=tol, rtol=tol, msg=f"{name} {dtype} {label} km={key_major}")
        q, k, _, mask, _ = make_case(c, torch.float32, seed=2)
        km = mask if mask is not None and mask.dim() == 2 else None
        p, lse = attention_row(q[:, :, 0].to(dev), k.to(dev), scale=0.5, key_mask=None if km is None else km.to(dev), use_triton=True)
        rp, rl = attention_row_ref(q[:, :, 0], k, scale=0.5, key_mask=km)
        torch.testing.assert_close(p.cpu(), rp, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lse.cpu(), rl, atol=1e-5, rtol=1e-4)
    print("TRITON-CHECKS-OK")


@pytest.mark.skipif(not (ON_GPU or INTERP), reason="runs natively on a GPU or in the interpreter subprocess below")
def test_triton_matches_reference():
    _triton_checks()


@pytest.mark.skipif(ON_GPU or INTERP, reason="the GPU / interpreter run above covers it")
def test_triton_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    code = "import sys; sys.path.insert(0, %r); import test_kernels; test_kernels._triton_checks()" % os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=os.path.dirname(__file__))
    assert out.returncode == 0 and "TRITON-CHECKS-OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def test_launcher_rejects_bad_shapes():
    from tokensieve.kernels import attention_with_importance
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        attention_with_importance(q, k, k)
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        attention_with_importance(q, q, q, attn_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"query_weights must be \[B, Sq\]=\[1, 4\]"):
        attention_with_importance(q, q, q, query_weights=torch.ones(4))
    with pytest.raises(ValueError, match="share one dtype"):
        attention_with_importance(q, q.half(), q)


def _engine_fastv(path):
    import tokensieve
    from conftest import noise_image
    with tokensieve.load(path) as engine:
        res = engine.generate("what is the colour", images=[noise_image(3)], plan="fastv:layer=2,keep=9",
                              max_new_tokens=4, output_logits=True)
    return res


def test_engine_scoring_layer_through_fused_kernel(tiny_path):
    """The engine's scoring layer through the Triton kernel (interpreter) == the reference path."""
    pytest.importorskip("triton")
    path = tiny_path("llava")
    ref = _engine_fastv(path)
    code = ("import sys, json; sys.path.insert(0, %r); import test_kernels; r = test_kernels._engine_fastv(%r);"
            "print('RESULT', json.dumps([r.kept[0].tolist(), r.token_ids, r.scores[0].tolist()]))") % (os.path.dirname(__file__), path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=os.path.dirname(__file__))
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-3000:]
    import json
    kept, tokens, scores = json.loads(line[7:])
    assert kept == ref.kept[0].tolist() and tokens == ref.token_ids
    torch.testing.assert_close(torch.tensor(scores), ref.scores[0], atol=1e-5, rtol=1e-4)


def test_benchmark_script_smoke(tmp_path):
    from tokensieve.kernels import bench
    stem = bench.main(["--smoke", "--out", str(tmp_path)])
    text = open(stem + ".md").read()
    assert "| 128 | ours_all |" in text and "sdpa_flash" in text
    import json
    data = json.load(open(stem + ".json"))
    assert [r["seq"] for r in data["rows"]] == [64, 128] and data["env"]["torch"] == torch.__version__


def test_fake_implementations_give_shapes():
    import tokensieve.kernels  # noqa: F401  (registers the ops)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k = torch.empty(2, 8, 5, 64, dtype=torch.bfloat16), torch.empty(2, 2, 9, 64, dtype=torch.bfloat16)
        out, lse, imp = torch.ops.tokensieve.attention_with_importance(q, k, k, 0.125, True, None, None, False)
        probs, row_lse = torch.ops.tokensieve.attention_row(q[:, :, 0], k, 0.125, None)
    assert out.shape == (2, 5, 8, 64) and out.dtype == torch.bfloat16
    assert lse.shape == (2, 8, 5) and imp.shape == (2, 8, 9) and imp.dtype == torch.float32
    assert probs.shape == (2, 8, 9) and row_lse.shape == (2, 8)

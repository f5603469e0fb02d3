"""Invariants (a)-(e) on native video, on models built from transformers' own tester configurations of the
families that take a video natively (``adapter.video_token``: LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL; Qwen3-VL's
are in test_qwen3_vl.py). The two requests' 4-frame clips differ in frame size and the second carries an image too,
so their visual-token counts are uneven. References are independent: plain transformers ``generate`` and the eager
reference model of tests/reference.py.
"""
import pytest
import torch

from conftest import noise_image
from reference import hidden_slots, reference_model
from test_invariants import ATOL, _capture_last_row, _hf_generate, assert_matches_recompute
from test_tester_configs import PROMPTS, _depth, _plan, tester_engine, tester_path  # noqa: F401 (fixtures)
from tester_configs import TESTER

from tokensieve.engine.adapters import ADAPTERS

def _native_families() -> list[str]:
    """Tester families whose adapter takes a video natively (its ``video_token`` property is overridden)."""
    from tokensieve.engine.adapters.base import Adapter

    return [f for f in TESTER if ADAPTERS[f].video_token is not Adapter.video_token]


@pytest.fixture(params=_native_families())
def family(request):
    return request.param


SIZES = [(40, 56), (56, 40)]


def _videos(n: int = 2, family: str | None = None) -> list[dict]:
    """The second request carries an image beside its video: uneven visual-token counts also where the processor
    resizes every frame to one size (OneVision, InternVL), whose video tensors batch only at one frame count;
    where one request cannot hold both (SmolVLM) its clip has 6 frames instead of 4."""
    both = family is None or ADAPTERS[family].video_with_images
    frames = [4, 4 if both else 6]
    reqs = [dict(prompt=PROMPTS[i], video={"frames": [noise_image(10 * i + f, *SIZES[i]) for f in range(frames[i])],
                                           "video_fps": 4.0}) for i in range(n)]
    if n > 1 and both:
        reqs[1]["images"] = [noise_image(7, 48, 48)]
    return reqs


@pytest.mark.parametrize("batched", [False, True], ids=["single", "padded"])
def test_a_no_plan_matches_transformers(family, tester_engine, tester_path, batched):
    engine = tester_engine(family)
    reqs = _videos(2 if batched else 1, family)
    inputs = engine.prepare_batch(reqs)
    ref_tokens, ref_logits = _hf_generate(tester_path(family), inputs, 5)
    for b, res in enumerate(engine.generate_batch([dict(r, max_new_tokens=5) for r in reqs], output_logits=True)):
        n = len(res.token_ids)
        assert n > 0 and res.token_ids == ref_tokens[b, :n].tolist()
        torch.testing.assert_close(res.logits, ref_logits[b, :n], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("plan", ["random:keep=1.0", "fastv:layer=1,keep=1.0", "dycoke:keep=1.0"])
def test_b_keep_everything_is_identity(family, tester_engine, plan):
    engine = tester_engine(family)
    reqs = [dict(r, max_new_tokens=4) for r in _videos(2, family)]
    base = engine.generate_batch(reqs, output_logits=True)
    for a, b in zip(base, engine.generate_batch([dict(r, plan=plan) for r in reqs], output_logits=True)):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        assert b.kept[0].tolist() == list(range(a.stats["visual_tokens"]))


@pytest.mark.parametrize("plan", ["dycoke:keep=0.5,positions=original", "random:keep=0.5,positions=original;fastv:layer=1,keep=0.5",
                                  "fastv:layer={last},keep=0.25"])
def test_c_cached_decode_equals_uncached_recompute(family, tester_engine, tester_path, plan):
    engine = tester_engine(family)
    plan = _plan(engine, plan)
    req = _videos(1)[0]
    res = engine.generate(req["prompt"], video=req["video"], plan=plan, max_new_tokens=5, output_logits=True)
    assert res.stats["kept_tokens"] < res.stats["visual_tokens"]
    assert_matches_recompute(engine, tester_path(family), res, engine.prepare(req["prompt"], video=req["video"]))


@pytest.mark.parametrize("plan", [None, "dycoke:keep=0.5;fastv:layer={last},keep=0.5"])
def test_d_padded_batch_equals_one_at_a_time(family, tester_engine, plan):
    engine = tester_engine(family)
    reqs = [dict(r, plan=_plan(engine, plan), max_new_tokens=5) for r in _videos(2, family)]
    batched = engine.generate_batch(reqs, output_logits=True)
    assert len({res.stats["visual_tokens"] for res in batched}) > 1  # uneven visual-token counts
    for req, res in zip(reqs, batched):
        one = engine.generate_batch([req], output_logits=True)[0]
        assert res.token_ids == one.token_ids
        assert [k.tolist() for k in res.kept] == [k.tolist() for k in one.kept]
        torch.testing.assert_close(res.logits, one.logits, atol=ATOL, rtol=1e-4)


def test_e_fastv_on_a_video_keeps_top_k_of_eager_attention(family, tester_engine, tester_path):
    """After a uniform pre-LLM stage, FastV at the tester's last layer keeps top-k of the eager attention of the
    layer before it (plain transformers), in the video's original token coordinates."""
    engine = tester_engine(family)
    req = _videos(1)[0]
    inputs = engine.prepare(req["prompt"], video=req["video"])
    slots = torch.isin(inputs["input_ids"][0], torch.tensor(engine.adapter.visual_token_ids)).nonzero().flatten()
    n_uni = 3 * slots.numel() // 4
    n_fast, layer = n_uni // 3, _depth(engine) - 1
    res = engine.generate(req["prompt"], video=req["video"], max_new_tokens=2,
                          plan=f"uniform:keep={n_uni},positions=original;fastv:layer={layer},keep={n_fast}")
    uni, fast = res.kept
    hide = hidden_slots(inputs["input_ids"], engine.adapter.visual_token_ids, [uni] * _depth(engine))
    ref = reference_model(tester_path(family), hide)
    captured = {}
    hook = _capture_last_row(ref, layer=layer - 1, store=captured, hide=hide[layer - 1])
    with torch.no_grad():
        ref(**inputs)
    hook.remove()
    attn = captured["row"][slots[uni]]
    assert fast.tolist() == uni[torch.topk(attn, n_fast).indices].sort().values.tolist()


def test_videos_of_different_lengths_batch_and_equal_one_at_a_time(family, tester_engine):
    """4 and 6 frames in one call: OneVision's processor stacks a batch's videos, so the engine batches them
    apart (by planned frame count); the Qwen processors concatenate patches and batch them together."""
    engine = tester_engine(family)
    reqs = [dict(prompt=PROMPTS[i], video={"frames": [noise_image(20 + f, 48, 48) for f in range(n)], "video_fps": 4.0},
                 max_new_tokens=3) for i, n in enumerate((4, 6))]
    batched = engine.generate_batch(reqs, output_logits=True)
    assert batched[0].stats["visual_tokens"] < batched[1].stats["visual_tokens"]
    for req, res in zip(reqs, batched):
        one = engine.generate_batch([req], output_logits=True)[0]
        assert res.token_ids == one.token_ids
        torch.testing.assert_close(res.logits, one.logits, atol=ATOL, rtol=1e-4)

"""The invariants of test_invariants.py on models built from transformers' own tester configurations.

``tester_configs.TESTER`` holds each family's ``*VisionText2TextModelTester`` configuration (file and commit
cited there, with the few changes stated); the models here are built from it like ``make_tiny`` builds its
own. The plans use only layers the tester's depth has (2 to 4 LLM layers, 2 tower layers); a plan that
needs a deeper LLM than the tester's is skipped, saying so.

(a) no plan == transformers generate (tokens identical, logits allclose), batch of 1 and padded
(b) a keep-everything stage anywhere == no plan
(c) pruned + cached decoding == recomputing without a cache (independent eager reference)
(d) a padded batch with uneven visual-token counts == the same requests one at a time
(e) kept indices in original coordinates: FastV's kept set == top-k of eager attention
"""
import pytest
import torch

import tokensieve
from conftest import noise_image
from reference import hidden_slots, reference_model
from test_invariants import ATOL, PROMPTS, _capture_last_row, _hf_generate, assert_matches_recompute
from tester_configs import TESTER, write_tester_model

# LLaVA-1.5, OneVision, Gemma 3 and SmolVLM give every image of these sizes the same token count (a fixed crop; one
# 16 px tiling; a fixed square; 2 x 2 crops + global): their second request carries two images, so the batch's
# visual-token counts are uneven
TWO_IMAGES = ("llava", "llava_onevision", "gemma3", "smolvlm")


@pytest.fixture(scope="session")
def tester_path(tmp_path_factory):
    paths = {}

    def get(family: str) -> str:
        if family not in paths:
            paths[family] = write_tester_model(family, tmp_path_factory.mktemp(f"tester-{family}"))
        return paths[family]

    return get


@pytest.fixture(scope="session")
def tester_engine(tester_path):
    engines = {}

    def get(family: str) -> tokensieve.Engine:
        if family not in engines:
            engines[family] = tokensieve.load(tester_path(family))
        return engines[family]

    yield get
    for e in engines.values():
        e.close()


@pytest.fixture(params=list(TESTER))
def family(request):
    return request.param


def _requests(family: str) -> list[dict]:
    """Three requests of different prompts and image sizes (uneven visual-token counts in every family)."""
    second = [noise_image(1, 56, 40)] + ([noise_image(2, 48, 48)] if family in TWO_IMAGES else [])
    return [dict(prompt=PROMPTS[0], images=[noise_image(0, 40, 56)]), dict(prompt=PROMPTS[1], images=second),
            dict(prompt=PROMPTS[2], images=[noise_image(3, 48, 48)])]


def _depth(engine) -> int:
    return engine.model.config.get_text_config().num_hidden_layers


def _plan(engine, template: str | None, min_layers: int = 2) -> str | None:
    """``template`` with ``{last}`` = the tester's last LLM layer; skips where the tester is too shallow."""
    if _depth(engine) < min_layers:
        pytest.skip(f"this plan needs {min_layers} LLM layers; the tester configuration has {_depth(engine)}")
    return None if template is None else template.format(last=_depth(engine) - 1)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "padded"])
def test_a_no_plan_matches_transformers(family, tester_engine, tester_path, batched):
    engine = tester_engine(family)
    reqs = _requests(family)[: 3 if batched else 1]
    inputs = engine.prepare_batch(reqs)
    ref_tokens, ref_logits = _hf_generate(tester_path(family), inputs, 6)
    results = engine.generate_batch([dict(r, max_new_tokens=6) for r in reqs], output_logits=True)
    for b, res in enumerate(results):
        n = len(res.token_ids)
        assert n > 0 and res.token_ids == ref_tokens[b, :n].tolist()
        torch.testing.assert_close(res.logits, ref_logits[b, :n], atol=ATOL, rtol=1e-4)
        assert res.kept == [] and res.stats["kept_tokens"] == res.stats["visual_tokens"]


KEEP_ALL = {
    "pre_llm": "random:keep=1.0",
    "llm_layer1": "fastv:layer=1,keep=1.0",
    "llm_last": "fastv:layer={last},keep=1.0",
    "two_stages": "uniform:keep=1.0;fastv:layer={last},keep=1.0",
    "vision": "uniform:where=vision,layer=1,keep=1.0",
}


@pytest.mark.parametrize("where", list(KEEP_ALL))
def test_b_keep_everything_is_identity(family, tester_engine, where):
    engine = tester_engine(family)
    if where == "vision" and engine.adapter.vision_prefix is None:
        pytest.skip("this family has no vision-tower stages")
    plan = _plan(engine, KEEP_ALL[where])
    reqs = [dict(r, max_new_tokens=5) for r in _requests(family)[:2]]
    base = engine.generate_batch(reqs, output_logits=True)
    kept = engine.generate_batch([dict(r, plan=plan) for r in reqs], output_logits=True)
    for a, b in zip(base, kept):
        assert len(b.kept) == len(tokensieve.Plan.parse(plan).stages)
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        for k in b.kept:
            assert k.tolist() == list(range(a.stats["visual_tokens"]))


@pytest.mark.parametrize("plan, min_layers", [("fastv:layer={last},keep=0.25", 2),
                                              ("random:keep=0.5,positions=original;fastv:layer=1,keep=0.5", 2),
                                              ("uniform:keep=0.5,positions=original", 2),
                                              ("fastv:layer=1,keep=0.6;fastv:layer=2,keep=0.3", 3)])
def test_c_cached_decode_equals_uncached_recompute(family, tester_engine, tester_path, plan, min_layers):
    engine = tester_engine(family)
    plan = _plan(engine, plan, min_layers)
    req = _requests(family)[0]
    res = engine.generate(req["prompt"], images=req["images"], plan=plan, max_new_tokens=6, output_logits=True)
    assert res.stats["kept_tokens"] < res.stats["visual_tokens"]
    assert_matches_recompute(engine, tester_path(family), res, engine.prepare(req["prompt"], images=req["images"]))


@pytest.mark.parametrize("plan", [None, "random:keep=0.5;fastv:layer={last},keep=0.25", "uniform:keep=0.5"])
def test_d_padded_batch_equals_one_at_a_time(family, tester_engine, plan):
    engine = tester_engine(family)
    reqs = [dict(r, plan=_plan(engine, plan), max_new_tokens=6) for r in _requests(family)]
    batched = engine.generate_batch(reqs, output_logits=True)
    assert len({res.stats["visual_tokens"] for res in batched}) > 1  # uneven visual-token counts
    for req, res in zip(reqs, batched):
        one = engine.generate_batch([req], output_logits=True)[0]
        assert res.token_ids == one.token_ids
        assert [k.tolist() for k in res.kept] == [k.tolist() for k in one.kept]
        torch.testing.assert_close(res.logits, one.logits, atol=ATOL, rtol=1e-4)
        assert res.stats["batch_size"] == 3 and one.stats["batch_size"] == 1


@pytest.mark.parametrize("scoring", ["fused", "eager"])
def test_e_kept_in_original_coordinates_fastv_matches_eager_attention(family, tester_engine, tester_path, scoring):
    """FastV at the tester's last LLM layer, after a uniform pre-LLM stage, keeps top-k of eager attention
    (plain transformers, the layer before it), in the request's original visual-token coordinates."""
    engine = tester_engine(family)
    req = _requests(family)[0]
    inputs = engine.prepare(req["prompt"], images=req["images"])
    slots = torch.isin(inputs["input_ids"][0], torch.tensor(engine.adapter.visual_token_ids)).nonzero().flatten()
    n_uni = max(4, 3 * slots.numel() // 4)
    n_fast, layer = max(2, n_uni // 3), _depth(engine) - 1
    res = engine.generate(req["prompt"], images=req["images"], max_new_tokens=2,
                          plan=f"uniform:keep={n_uni},positions=original;fastv:layer={layer},keep={n_fast},scoring={scoring}")
    uni, fast = res.kept
    assert set(fast.tolist()) <= set(uni.tolist()) and len(uni) == n_uni and len(fast) == n_fast
    hide = hidden_slots(inputs["input_ids"], engine.adapter.visual_token_ids, [uni] * _depth(engine))
    ref = reference_model(tester_path(family), hide)
    captured = {}
    q_hook = _capture_last_row(ref, layer=layer - 1, store=captured, hide=hide[layer - 1])
    with torch.no_grad():
        ref(**inputs)
    q_hook.remove()
    attn = captured["row"][slots[uni]]  # head-mean attention of the last token to the surviving tokens
    expected = uni[torch.topk(attn, n_fast).indices].sort().values
    assert fast.tolist() == expected.tolist()
    torch.testing.assert_close(res.scores[1], attn, atol=1e-5, rtol=1e-4)

"""Invariants of the engine, for every family, against plain transformers.

(a) no plan == transformers generate (tokens identical, logits allclose), batch of 1 and padded
(b) a keep-everything stage anywhere == no plan
(c) pruned + cached decoding == recomputing without a cache (independent eager reference)
(d) a padded batch == the same requests one at a time
(e) kept indices are in the request's original visual-token coordinates
"""
import importlib
import warnings

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import noise_image
from reference import alive_per_layer, extend_inputs, hidden_slots, reference_model

PROMPTS = ["what is the colour of the circle", "how many red objects", "is there a blue square on the left"]
ATOL = 2e-4


def _requests(family):
    sizes = [(40, 56), (56, 40), (48, 48)]  # different sizes: different token counts for anyres / Qwen
    return [dict(prompt=p, images=[noise_image(i, *sizes[i])]) for i, p in enumerate(PROMPTS)]


def _hf_generate(path, inputs, n):
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    return new, torch.stack(out.logits, dim=1).float()


@pytest.mark.parametrize("batched", [False, True], ids=["single", "padded"])
def test_a_no_plan_matches_transformers(family, engine_for, tiny_path, batched):
    engine = engine_for(family)
    reqs = _requests(family)[: 3 if batched else 1]
    inputs = engine.prepare_batch(reqs)
    ref_tokens, ref_logits = _hf_generate(tiny_path(family), inputs, 6)
    results = engine.generate_batch([dict(r, max_new_tokens=6) for r in reqs], output_logits=True)
    for b, res in enumerate(results):
        n = len(res.token_ids)
        assert res.token_ids == ref_tokens[b, :n].tolist()
        torch.testing.assert_close(res.logits, ref_logits[b, :n], atol=ATOL, rtol=1e-4)
        assert res.kept == [] and res.stats["kept_tokens"] == res.stats["visual_tokens"]


KEEP_ALL = {
    "pre_llm": "random:keep=1.0",
    "llm_layer1": "fastv:layer=1,keep=1.0",
    "llm_last": "fastv:layer=3,keep=1.0",
    "two_stages": "uniform:keep=1.0;fastv:layer=2,keep=1.0",
    "vision": "uniform:where=vision,layer=1,keep=1.0",
}


@pytest.mark.parametrize("where", list(KEEP_ALL))
def test_b_keep_everything_is_identity(family, engine_for, where):
    engine = engine_for(family)
    if where == "vision" and engine.adapter.vision_prefix is None:
        pytest.skip("this family has no vision-tower stages")
    reqs = [dict(r, max_new_tokens=5) for r in _requests(family)[:2]]
    base = engine.generate_batch(reqs, output_logits=True)
    kept = engine.generate_batch([dict(r, plan=KEEP_ALL[where]) for r in reqs], output_logits=True)
    for a, b in zip(base, kept):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        for k in b.kept:
            assert k.tolist() == list(range(a.stats["visual_tokens"]))



@pytest.mark.parametrize("plan", ["fastv:layer=2,keep=0.25", "random:keep=0.5,positions=original;fastv:layer=1,keep=6",
                                  "uniform:keep=12,positions=original", "fastv:layer=1,keep=10;fastv:layer=3,keep=3"])
def test_c_cached_decode_equals_uncached_recompute(family, engine_for, tiny_path, plan):
    engine = engine_for(family)
    req = _requests(family)[0]
    res = engine.generate(req["prompt"], images=req["images"], plan=plan, max_new_tokens=6, output_logits=True)
    assert_matches_recompute(engine, tiny_path(family), res, engine.prepare(req["prompt"], images=req["images"]))


def assert_matches_recompute(engine, path: str, res, inputs) -> None:
    """res (pruned, cached decoding) == the eager reference over the whole sequence without a cache,
    the pruned tokens hidden from every layer at or after their stage."""
    n_layers = engine.model.config.get_text_config().num_hidden_layers
    hide = hidden_slots(inputs["input_ids"], engine.adapter.visual_token_ids, alive_per_layer(res, n_layers))
    # a random model may emit an image placeholder; the reference cannot be fed one, so check up to it
    tokens = res.token_ids
    n = next((i + 1 for i, t in enumerate(tokens) if t in engine.adapter.visual_token_ids), len(tokens))
    full = extend_inputs(inputs, tokens[: n - 1])
    hide = {j: torch.cat([h, torch.zeros(1, n - 1, dtype=torch.bool)], 1) for j, h in hide.items()}
    ref = reference_model(path, hide)
    with torch.no_grad():
        logits = ref(**full).logits[0, inputs["input_ids"].shape[1] - 1:].float()
    assert logits.argmax(-1).tolist() == tokens[:n]
    torch.testing.assert_close(res.logits[:n], logits, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("plan", [None, "random:keep=0.5;fastv:layer=2,keep=0.25", "uniform:keep=10"])
def test_d_padded_batch_equals_one_at_a_time(family, engine_for, plan):
    engine = engine_for(family)
    reqs = [dict(r, plan=plan, max_new_tokens=6) for r in _requests(family)]
    batched = engine.generate_batch(reqs, output_logits=True)
    for req, res in zip(reqs, batched):
        one = engine.generate_batch([req], output_logits=True)[0]
        assert res.token_ids == one.token_ids
        assert [k.tolist() for k in res.kept] == [k.tolist() for k in one.kept]
        torch.testing.assert_close(res.logits, one.logits, atol=ATOL, rtol=1e-4)
        assert res.stats["batch_size"] == 3 and one.stats["batch_size"] == 1


@pytest.mark.parametrize("scoring", ["fused", "eager"])
def test_e_kept_in_original_coordinates_fastv_matches_eager_attention(family, engine_for, tiny_path, scoring):
    """FastV's kept set, after a uniform pre-LLM stage, equals top-k of eager attention (plain transformers);
    so does the peers' way of scoring it (``scoring=eager``, the benchmark's baseline)."""
    engine = engine_for(family)
    req = _requests(family)[0]
    res = engine.generate(req["prompt"], images=req["images"],
                          plan=f"uniform:keep=16,positions=original;fastv:layer=2,keep=5,scoring={scoring}", max_new_tokens=2)
    uni, fast = res.kept
    assert set(fast.tolist()) <= set(uni.tolist()) and len(uni) == 16 and len(fast) == 5
    # reference: eager transformers over the sequence with the uniform-dropped tokens hidden from every layer
    inputs = engine.prepare(req["prompt"], images=req["images"])
    n_layers = engine.model.config.get_text_config().num_hidden_layers
    hide = hidden_slots(inputs["input_ids"], engine.adapter.visual_token_ids, [uni] * n_layers)
    ref = reference_model(tiny_path(family), hide)
    captured = {}
    q_hook = _capture_last_row(ref, layer=1, store=captured, hide=hide[1])
    with torch.no_grad():
        ref(**inputs)
    q_hook.remove()
    slots = torch.isin(inputs["input_ids"][0], torch.tensor(engine.adapter.visual_token_ids)).nonzero().flatten()
    attn = captured["row"][slots[uni]]  # head-mean attention of the last token to the surviving tokens
    expected = uni[torch.topk(attn, 5).indices].sort().values
    assert fast.tolist() == expected.tolist()
    assert res.scores[1] is not None and res.scores[1].shape == (16,)
    torch.testing.assert_close(res.scores[1], attn, atol=1e-5, rtol=1e-4)


def _capture_last_row(model, layer, store, hide):
    """Eager last-query attention row of ``layer`` (head mean), from q/k recomputed in the test."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
    lm = getattr(model.model, "language_model", None) or model.model.text_model  # SmolVLM: text_model
    attn_mod = lm.layers[layer].self_attn

    def hook(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        b, s, _ = x.shape
        hd = module.head_dim
        q, k = module.q_proj(x).view(b, s, -1, hd), module.k_proj(x).view(b, s, -1, hd)
        if hasattr(module, "q_norm"):  # Qwen3: an RMSNorm over each head's query and key before RoPE
            q, k = module.q_norm(q), module.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        own = importlib.import_module(type(module).__module__)
        if cos.dim() == 3 and hasattr(own, "rotate_half_llm"):  # GLM-4V: interleaved pairs, RoPE on part of each
            q, k = own.apply_rotary_pos_emb(q, k, cos, sin)  # head (partial_rotary_factor): the model module's own
        elif cos.dim() == 3 and cos.shape[-1] == hd:
            q, k = llama_rope(q, k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, 1)
        logits = (q[:, :, -1:] @ k.transpose(-1, -2)).float() * module.scaling
        logits = logits.masked_fill(hide[:, None, None, :s], float("-inf"))
        store["row"] = logits.softmax(-1)[0, :, 0].mean(0)

    return attn_mod.register_forward_pre_hook(hook, with_kwargs=True)


def test_f_no_deprecated_cache_argument(family, engine_for):
    """transformers 5.25 renamed the forward's ``past_key_values`` to ``cache``; the engine passes the
    name the installed version takes, so a padded, pruned, cached generate warns about neither."""
    engine = engine_for(family)
    reqs = [dict(r, plan="fastv:layer=2,keep=0.25", max_new_tokens=3) for r in _requests(family)[:2]]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(past_key_values|cache).*deprecated", category=FutureWarning)
        engine.generate_batch(reqs)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_g_engine_leaves_the_callers_tokenizer_alone(family, tiny_path):
    """A processor whose tokenizer pads on the right (the transformers default of many checkpoints): the engine
    pads its batches on the left without changing it, and a padded batch still equals one request at a time."""
    import tokensieve
    from transformers import AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_path(family), attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(tiny_path(family))
    processor.tokenizer.padding_side = "right"
    engine = tokensieve.Engine(model, processor)
    try:
        assert processor.tokenizer.padding_side == "right"
        reqs = [dict(r, max_new_tokens=4) for r in _requests(family)]
        batched = engine.generate_batch(reqs, output_logits=True)
        assert processor.tokenizer.padding_side == "right"
        mask = engine.prepare_batch(reqs)["attention_mask"]
        assert bool((mask[:, -1] == 1).all()) and not bool((mask[:, 0] == 1).all())  # padded on the left
        for req, res in zip(reqs, batched):
            one = engine.generate_batch([req], output_logits=True)[0]
            assert res.token_ids == one.token_ids
            torch.testing.assert_close(res.logits, one.logits, atol=ATOL, rtol=1e-4)
    finally:
        engine.close()

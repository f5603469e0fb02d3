"""Qwen3-VL (DeepStack): the features of several tower layers, added after LLM layers 0..n-1 at the visual
tokens, stay aligned with the surviving tokens; the invariants hold on transformers' own tester configuration
for qwen3_vl (images and native video) and on a tiny qwen3_vl_moe model, which runs through the same adapter.

The tiny ``make_tiny`` model runs the whole invariant suite through tests/test_invariants.py,
tests/test_native_video.py and tests/test_pruners.py (they walk every family); this file adds what those
cannot see: DeepStack's gather against a reference built by hand from the model's own pieces, and the
other configurations.
"""
import pytest
import torch
from transformers import AutoModelForImageTextToText

import tokensieve
from tokensieve import testing
from tokensieve.engine.adapters import qwen3_vl

from conftest import noise_image
from reference import hidden_slots, reference_model
from test_invariants import ATOL, _capture_last_row, _hf_generate, assert_matches_recompute

# transformers' tests/models/qwen3_vl/test_modeling_qwen3_vl.py, Qwen3VLVisionText2TextModelTester's defaults
# (commit 05cd1ec), as data; vocabulary size and special ids are the test tokenizer's (set in _write_tester)
TESTER_TEXT = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "hidden_act": "silu", "head_dim": 8,
               "hidden_size": 32, "vocab_size": 99, "intermediate_size": 37, "max_position_embeddings": 512,
               "model_type": "qwen3_vl", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
               "rope_theta": 10000, "tie_word_embeddings": True,
               "rope_parameters": {"rope_type": "default", "mrope_section": [16, 8, 8], "mrope_interleaved": True}}
TESTER_VISION = {"depth": 2, "in_chans": 3, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 32,
                 "out_hidden_size": 32, "hidden_size": 32, "num_heads": 4, "patch_size": 16, "spatial_merge_size": 1,
                 "temporal_patch_size": 2, "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]}
TESTER_TOP = {"tie_word_embeddings": True}
PROMPTS = ["what is the colour of the circle", "how many red objects", "is there a blue square on the left"]
SIZES = [(40, 56), (56, 40), (48, 48)]


def _save(model, processor, tok, path) -> str:
    """As ``tokensieve.testing.make_tiny`` writes a tiny model: a visible spread in the logits, the tokenizer's
    pad and end ids in the generation config."""
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _write_tester(path) -> str:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    tok = testing.tokenizer_for("qwen3_vl")
    text = dict(TESTER_TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    cfg = Qwen3VLConfig(text_config=text, vision_config=TESTER_VISION, **TESTER_TOP, **qwen3_vl.placeholder_ids(tok))
    return _save(Qwen3VLForConditionalGeneration(cfg), qwen3_vl.processor(cfg, tok, pixels=(32 * 32, 128 * 128)), tok,
                 path)


def _write_moe(path) -> str:
    torch.manual_seed(0)
    tok = testing.tokenizer_for("qwen3_vl")
    model, processor = qwen3_vl.tiny_moe_model(tok)
    return _save(model, processor, tok, path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return {"tester": _write_tester(tmp_path_factory.mktemp("qwen3_tester")),
            "moe": _write_moe(tmp_path_factory.mktemp("qwen3_moe"))}


@pytest.fixture(scope="module")
def engines(paths):
    loaded = {name: tokensieve.load(p) for name, p in paths.items()}
    yield loaded
    for e in loaded.values():
        e.close()


def _images(n: int) -> list[dict]:
    return [dict(prompt=PROMPTS[i], images=[noise_image(i, *SIZES[i])]) for i in range(n)]


def _videos(n: int) -> list[dict]:
    return [dict(prompt=PROMPTS[i], video={"frames": [noise_image(10 * i + f, *SIZES[i]) for f in range(4)],
                                          "video_fps": 4.0}) for i in range(n)]


MEDIA = {"images": _images, "video": _videos}


def _media(req: dict) -> dict:
    return {k: req[k] for k in ("images", "video") if k in req}


# ---- DeepStack: the pre-LLM gather, against the model's own text forward on hand-pruned inputs ---------------

def pruned_reference_logits(model, inputs: dict, kept: torch.Tensor, deepstack=lambda feats, kept: feats[kept]):
    """Prefill logits [V] of a batch-of-one request with only the visual tokens ``kept`` (original indices):
    the tower's features and DeepStack features from the model's own ``get_*_features``, the dropped tokens
    removed from the sequence, M-RoPE positions from ``get_rope_index`` on the full sequence then gathered,
    and the text model's own forward (its ``_deepstack_process``) given the gathered DeepStack features.
    ``deepstack(feats [N, D], kept)``: which rows reach the LLM (the right answer: the kept ones)."""
    inner, cfg = model.model, model.config
    ids = inputs["input_ids"]
    feats, stacks = [], []
    for pixels, grid, encode in (("pixel_values", "image_grid_thw", inner.get_image_features),
                                 ("pixel_values_videos", "video_grid_thw", inner.get_video_features)):
        if pixels in inputs:
            out = encode(inputs[pixels], inputs[grid])
            feats.append(torch.cat(out.pooler_output))
            stacks.append([torch.cat(layer) for layer in out.deepstack_features])
    assert len(feats) == 1, "one kind of visual input per reference request"
    vis = torch.isin(ids[0], torch.tensor([cfg.image_token_id, cfg.video_token_id]))
    slots = vis.nonzero().flatten()
    embeds = inner.get_input_embeddings()(ids)
    embeds[0, slots] = feats[0].to(embeds.dtype)
    pos, _ = inner.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                                  video_grid_thw=inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"])
    keep = ~vis
    keep[slots[kept]] = True
    hidden = inner.language_model(inputs_embeds=embeds[:, keep], position_ids=pos[:, :, keep],
                                  visual_pos_masks=vis[keep][None],
                                  deepstack_visual_embeds=[deepstack(f, kept) for f in stacks[0]]).last_hidden_state
    return model.lm_head(hidden[0, -1]).float()


def _assert_gathers_deepstack(engine, path: str, req: dict, plan: str):
    res = engine.generate(req["prompt"], **_media(req), plan=plan, max_new_tokens=1, output_logits=True)
    kept = res.kept[0]
    assert 0 < kept.numel() < res.stats["visual_tokens"]
    inputs = engine.prepare(req["prompt"], **_media(req))
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        ref = pruned_reference_logits(model, inputs, kept)
        first = pruned_reference_logits(model, inputs, kept, deepstack=lambda f, k: f[: k.numel()])
        none = pruned_reference_logits(model, inputs, kept, deepstack=lambda f, k: torch.zeros_like(f[k]))
    torch.testing.assert_close(res.logits[0], ref, atol=ATOL, rtol=1e-4)
    for wrong in (first, none):  # the reference tells a missing or an ungathered DeepStack apart
        assert (wrong - ref).abs().max() > 10 * ATOL


@pytest.mark.parametrize("kind", list(MEDIA))
@pytest.mark.parametrize("plan", ["uniform:keep=0.5", "random:keep=5"])
def test_pre_llm_prune_gathers_deepstack_tiny(engine_for, tiny_path, kind, plan):
    _assert_gathers_deepstack(engine_for("qwen3_vl"), tiny_path("qwen3_vl"), MEDIA[kind](1)[0], plan)


@pytest.mark.parametrize("name", ["tester", "moe"])
def test_pre_llm_prune_gathers_deepstack(engines, paths, name):
    _assert_gathers_deepstack(engines[name], paths[name], _images(1)[0], "random:keep=0.5")


def test_deepstack_reaches_the_layers_the_config_names(engine_for):
    """The tiny model's DeepStack feeds LLM layers 0-2 (three tower layers); the engine's hooks sit on those."""
    engine = engine_for("qwen3_vl")
    assert engine.model.config.vision_config.deepstack_visual_indexes == [0, 1, 2]
    assert engine.adapter.deepstack_layers == 3
    hooked = [i for i, layer in enumerate(engine.adapter.llm_layers) if layer._forward_hooks]
    assert hooked == [0, 1, 2]


# ---- the invariants on transformers' tester configuration and on the MoE model ------------------------------

@pytest.mark.parametrize("kind", list(MEDIA))
@pytest.mark.parametrize("name", ["tester", "moe"])
def test_a_no_plan_matches_transformers(engines, paths, name, kind):
    engine = engines[name]
    assert type(engine.adapter).__name__ == "Qwen3VLAdapter"
    assert engine.model.config.model_type == {"tester": "qwen3_vl", "moe": "qwen3_vl_moe"}[name]
    reqs = MEDIA[kind](3)
    inputs = engine.prepare_batch(reqs)
    ref_tokens, ref_logits = _hf_generate(paths[name], inputs, 5)
    results = engine.generate_batch([dict(r, max_new_tokens=5) for r in reqs], output_logits=True)
    for b, res in enumerate(results):
        n = len(res.token_ids)
        assert res.token_ids == ref_tokens[b, :n].tolist()
        torch.testing.assert_close(res.logits, ref_logits[b, :n], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kind", list(MEDIA))
@pytest.mark.parametrize("plan", ["random:keep=1.0", "fastv:layer=1,keep=1.0", "uniform:keep=1.0;fastv:layer=1,keep=1.0"])
def test_b_keep_everything_is_identity(engines, kind, plan):
    engine = engines["tester"]
    reqs = [dict(r, max_new_tokens=4) for r in MEDIA[kind](2)]
    base = engine.generate_batch(reqs, output_logits=True)
    kept = engine.generate_batch([dict(r, plan=plan) for r in reqs], output_logits=True)
    for a, b in zip(base, kept):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(MEDIA))
@pytest.mark.parametrize("plan", ["fastv:layer=1,keep=0.25", "uniform:keep=0.5;fastv:layer=1,keep=3"])
def test_c_cached_decode_equals_uncached_recompute(engines, paths, kind, plan):
    engine = engines["tester"]
    req = MEDIA[kind](1)[0]
    res = engine.generate(req["prompt"], **_media(req), plan=plan, max_new_tokens=5, output_logits=True)
    assert_matches_recompute(engine, paths["tester"], res, engine.prepare(req["prompt"], **_media(req)))


@pytest.mark.parametrize("kind", list(MEDIA))
@pytest.mark.parametrize("plan", [None, "random:keep=0.5;fastv:layer=1,keep=0.25"])
def test_d_padded_batch_equals_one_at_a_time(engines, kind, plan):
    engine = engines["tester"]
    reqs = [dict(r, plan=plan, max_new_tokens=5) for r in MEDIA[kind](3)]
    batched = engine.generate_batch(reqs, output_logits=True)
    assert len({r.stats["visual_tokens"] for r in batched}) > 1  # uneven visual-token counts
    for req, res in zip(reqs, batched):
        one = engine.generate_batch([req], output_logits=True)[0]
        assert res.token_ids == one.token_ids
        assert [k.tolist() for k in res.kept] == [k.tolist() for k in one.kept]
        torch.testing.assert_close(res.logits, one.logits, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kind", list(MEDIA))
def test_e_fastv_kept_set_is_topk_of_eager_attention(engines, paths, kind):
    """FastV at layer 1 of the tester's two layers: its kept set after a uniform stage equals top-k of the eager
    attention of layer 0's last query (plain transformers, the uniform-dropped tokens hidden)."""
    engine = engines["tester"]
    req = MEDIA[kind](1)[0]
    res = engine.generate(req["prompt"], **_media(req), plan="uniform:keep=8;fastv:layer=1,keep=3", max_new_tokens=2)
    uni, fast = res.kept
    assert set(fast.tolist()) <= set(uni.tolist()) and len(uni) == 8 and len(fast) == 3
    inputs = engine.prepare(req["prompt"], **_media(req))
    hide = hidden_slots(inputs["input_ids"], engine.adapter.visual_token_ids, [uni] * 2)
    ref = reference_model(paths["tester"], hide)
    captured = {}
    hook = _capture_last_row(ref, layer=0, store=captured, hide=hide[0])
    with torch.no_grad():
        ref(**inputs)
    hook.remove()
    slots = torch.isin(inputs["input_ids"][0], torch.tensor(engine.adapter.visual_token_ids)).nonzero().flatten()
    attn = captured["row"][slots[uni]]
    assert fast.tolist() == uni[torch.topk(attn, 3).indices].sort().values.tolist()


# ---- native video: the processor's timestamps, never pruned --------------------------------------------------

def test_video_prompt_has_one_timestamped_run_per_temporal_patch(engine_for):
    """4 frames at 4 fps -> 2 temporal patches, each its own <|vision_start|> run after its timestamp text
    (the mean time of its two frames); a pruning plan drops visual tokens only."""
    engine = engine_for("qwen3_vl")
    req = _videos(1)[0]
    inputs = engine.prepare(req["prompt"], video=req["video"])
    text = engine.processor.tokenizer.decode(inputs["input_ids"][0])
    cfg = engine.model.config
    assert int((inputs["input_ids"] == cfg.vision_start_token_id).sum()) == 2
    assert int(inputs["video_grid_thw"][0, 0]) == 2
    assert engine.processor.tokenizer.unk_token in text  # the word-level test tokenizer: timestamps are unknown words
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = engine.model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        res = engine.generate(req["prompt"], video=req["video"], plan="random:keep=0.25", max_new_tokens=1)
    finally:
        hook.remove()
    ids, embeds = inputs["input_ids"][0], seen["embeds"][0]
    vis = torch.isin(ids, torch.tensor(engine.adapter.visual_token_ids))
    vis_slots, text_slots = vis.nonzero().flatten(), (~vis).nonzero().flatten()
    dropped = vis_slots[~torch.isin(torch.arange(vis_slots.numel()), res.kept[0])]
    assert embeds.shape[0] == text_slots.numel() + res.stats["kept_tokens"]
    # the LLM input's text rows: every non-visual prompt token (the timestamps among them), in order
    rows = text_slots - torch.searchsorted(dropped, text_slots)
    torch.testing.assert_close(embeds[rows], engine.adapter.embed(ids[text_slots][None])[0])


def test_moe_checkpoint_loads_through_the_qwen3_vl_adapter(paths):
    """``tokensieve.load`` accepts qwen3_vl_moe (its model type is among the adapter's) and names it nowhere
    else as a family."""
    from tokensieve.engine.adapters import ADAPTERS, model_types

    assert "qwen3_vl_moe" not in ADAPTERS and model_types()["qwen3_vl_moe"] is ADAPTERS["qwen3_vl"]
    assert "qwen3_vl_moe" not in testing.FAMILIES


def test_merged_token_receives_the_mean_deepstack_of_what_it_stands_for(engine_for, tiny_path):
    """ToMe before the LLM: each surviving token's DeepStack features are the mean of those of the original
    tokens merged into it (``res.groups``). Reference: the text model's own forward on the engine's LLM input,
    given DeepStack features averaged by hand over the groups; an unmerged (kept token's own) choice differs."""
    engine = engine_for("qwen3_vl")
    req = _images(1)[0]
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])
        seen.setdefault("pos", kwargs["position_ids"])

    hook = engine.model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        res = engine.generate(req["prompt"], **_media(req), plan="tome:keep=10", max_new_tokens=1, output_logits=True)
    finally:
        hook.remove()
    groups, kept = res.groups[0], res.kept[0]
    assert int(torch.bincount(groups[groups >= 0]).max()) > 1  # some token stands for several
    inputs = engine.prepare(req["prompt"], **_media(req))
    model = AutoModelForImageTextToText.from_pretrained(tiny_path("qwen3_vl")).eval()
    ids = inputs["input_ids"][0]
    vis = torch.isin(ids, torch.tensor(engine.adapter.visual_token_ids))
    keep = ~vis
    keep[vis.nonzero().flatten()[kept]] = True
    with torch.no_grad():
        stacks = [torch.cat(layer) for layer in model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]).deepstack_features]
        means = [torch.stack([f[groups == j].mean(0) for j in range(kept.numel())]) for f in stacks]

        def logits(deepstack):
            hidden = model.model.language_model(inputs_embeds=seen["embeds"], position_ids=seen["pos"],
                                                visual_pos_masks=vis[keep][None],
                                                deepstack_visual_embeds=deepstack).last_hidden_state
            return model.lm_head(hidden[0, -1]).float()

        ref, own = logits(means), logits([f[kept] for f in stacks])
    torch.testing.assert_close(res.logits[0], ref, atol=ATOL, rtol=1e-4)
    assert (own - ref).abs().max() > 10 * ATOL

"""Gemma 3: sliding-window and full layers, image tokens attending to each other both ways, pan-and-scan crops.

The tiny ``make_tiny`` model (layers sliding / full / sliding / full, window 16, 36 tokens per image: every prompt
with an image crosses the window) runs the whole invariant suite through tests/test_invariants.py and
tests/test_pruners.py, and transformers' tester configuration runs it through tests/test_tester_configs.py. This
file adds what those cannot see:

- no plan == transformers ``generate`` on a prompt and an answer longer than the window, and the engine hands the
  model its image blocks (without them transformers' answer differs);
- pruned, cached decoding == an eager recompute over the whole sequence whose masks are built here from the rules
  (causal or the same image, sliding layers ``k > q - window`` in original positions, pruned tokens hidden at and
  after their stage) - not from transformers' masks; the same recompute with the window counted in the pruned
  sequence's positions, or without the image blocks, differs;
- per-patch tower values pool to tokens as the projector's average pool does (a block mean written here);
- pan-and-scan: each crop is a tile (item) of its image, and the engine equals transformers on such prompts.
"""
import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForImageTextToText
from transformers.masking_utils import sdpa_mask

import tokensieve
from tokensieve import testing
from tokensieve.engine.adapters import gemma3

from conftest import noise_image
from reference import alive_per_layer, extend_inputs, hidden_slots
from test_invariants import ATOL, PROMPTS

RULE_ATTN = "tokensieve_test_gemma3_rules"
PAN = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=8)  # crops of the test's small images


def _hf_generate(path, inputs, n, **drop):
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    inputs = {k: v for k, v in inputs.items() if k != "num_crops" and k not in drop}
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1).float()


@pytest.fixture(scope="module")
def pan_path(tmp_path_factory):
    """The tiny model with a processor that has pan-and-scan on."""
    torch.manual_seed(0)
    tok = testing.tokenizer_for("gemma3")
    model, _ = gemma3.tiny_model(tok)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    path = tmp_path_factory.mktemp("gemma3_pan")
    model.eval().save_pretrained(path)
    gemma3.processor(model.config, tok, **PAN).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pan_engine(pan_path):
    engine = tokensieve.load(pan_path)
    yield engine
    engine.close()


# ---- no plan: transformers on a prompt and an answer longer than the window ----------------------------------

def test_no_plan_matches_transformers_across_the_window(engine_for, tiny_path):
    engine, path = engine_for("gemma3"), tiny_path("gemma3")
    window = engine.model.config.text_config.sliding_window
    req = dict(prompt=PROMPTS[0], images=[noise_image(0)])
    inputs = engine.prepare_batch([req])
    assert inputs["input_ids"].shape[1] > 2 * window  # the prompt crosses the window
    ref_tokens, ref_logits = _hf_generate(path, inputs, window + 4)
    res = engine.generate(req["prompt"], images=req["images"], max_new_tokens=window + 4, output_logits=True)
    n = len(res.token_ids)
    assert n == window + 4 and res.token_ids == ref_tokens[0, :n].tolist()  # decoding crosses it too
    torch.testing.assert_close(res.logits, ref_logits[0, :n], atol=ATOL, rtol=1e-4)
    _, causal_logits = _hf_generate(path, inputs, 1, token_type_ids=True)  # no image blocks: another answer
    assert (causal_logits[0, 0] - res.logits[0]).abs().max() > 100 * ATOL


# ---- pruned: an eager recompute with masks built here from the rules ------------------------------------------

def _image_runs(input_ids: torch.Tensor, image_id: int) -> torch.Tensor:
    """[L] the index of each slot's run of image tokens (-1: text), from the ids."""
    run, out, prev = -1, [], False
    for t in input_ids.tolist():
        is_img = t == image_id
        run += int(is_img and not prev)
        out.append(run if is_img else -1)
        prev = is_img
    return torch.tensor(out)


def _rule_mask(layer_type: str, window: int, runs: torch.Tensor, hidden: torch.Tensor, pruned_positions: bool,
               bidirectional: bool) -> torch.Tensor:
    """[S, S] allowed (query, key) of one layer over the whole sequence (batch of one, no padding)."""
    s = runs.numel()
    alive = ~hidden
    pos = (alive.long().cumsum(0) - 1) if pruned_positions else torch.arange(s)
    q, k = pos[:, None], pos[None, :]
    allowed = torch.arange(s)[None, :] <= torch.arange(s)[:, None]
    if bidirectional:
        allowed |= (runs[:, None] == runs[None, :]) & (runs[:, None] >= 0)
    if layer_type == "sliding_attention":
        allowed &= k > q - window
    return allowed & alive[None, :]


def _rule_model(path: str, runs: torch.Tensor, hide: dict, pruned_positions: bool = False, bidirectional: bool = True):
    """The plain transformers model with an eager attention whose mask is ``_rule_mask`` (transformers' own mask is
    ignored), so the reference does not share the rules' code with the engine or with transformers."""
    model = AutoModelForImageTextToText.from_pretrained(path)
    text = model.config.text_config

    def attn(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
        scores = q.float() @ k.transpose(-1, -2) * scaling
        s = q.shape[2]
        allowed = _rule_mask(text.layer_types[module.layer_idx], text.sliding_window, runs[:s],
                             hide[module.layer_idx][0, :s], pruned_positions, bidirectional)
        probs = scores.masked_fill(~allowed[None, None], float("-inf")).softmax(-1).nan_to_num(0.0)  # a pruned query
        # may see no key: its row 0 (never read), not NaN
        return (probs @ v).transpose(1, 2).to(q.dtype), None

    AttentionInterface.register(RULE_ATTN, attn)
    AttentionMaskInterface.register(RULE_ATTN, sdpa_mask)
    model.set_attn_implementation({"text_config": RULE_ATTN, "vision_config": "sdpa"})
    return model.eval()


def _recompute(path, engine, inputs, res, **variant) -> torch.Tensor:
    """Logits [n, V] of the rule-built reference over prompt + answer (no cache)."""
    n_layers = engine.model.config.text_config.num_hidden_layers
    tokens = res.token_ids
    full = extend_inputs(inputs, tokens[:-1])
    full["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros(1, len(tokens) - 1, dtype=torch.long)], 1)
    hide = hidden_slots(inputs["input_ids"], engine.adapter.visual_token_ids, alive_per_layer(res, n_layers))
    hide = {j: torch.cat([h, torch.zeros(1, len(tokens) - 1, dtype=torch.bool)], 1) for j, h in hide.items()}
    runs = _image_runs(full["input_ids"][0], engine.model.config.image_token_id)
    model = _rule_model(path, runs, hide, **variant)
    with torch.no_grad():
        return model(**full).logits[0, inputs["input_ids"].shape[1] - 1:].float()


@pytest.mark.parametrize("plan", ["fastv:layer=2,keep=0.25", "uniform:keep=12", "random:keep=0.5;fastv:layer=1,keep=6",
                                  "fastv:layer=1,keep=10;fastv:layer=3,keep=3"])
def test_pruned_cached_decode_equals_rule_built_recompute(engine_for, tiny_path, plan):
    engine, path = engine_for("gemma3"), tiny_path("gemma3")
    req = dict(prompt=PROMPTS[1], images=[noise_image(1, 56, 40)])
    res = engine.generate(req["prompt"], images=req["images"], plan=plan, max_new_tokens=12, output_logits=True)
    assert len(res.token_ids) == 12 and res.stats["kept_tokens"] < res.stats["visual_tokens"]
    inputs = engine.prepare(req["prompt"], images=req["images"])
    ref = _recompute(path, engine, inputs, res)
    assert ref.argmax(-1).tolist() == res.token_ids
    torch.testing.assert_close(res.logits, ref, atol=ATOL, rtol=1e-4)
    for variant in (dict(pruned_positions=True), dict(bidirectional=False)):  # the rules the test tells apart
        assert (_recompute(path, engine, inputs, res, **variant) - res.logits).abs().max() > 10 * ATOL, variant


def test_rules_reference_equals_transformers_without_pruning(engine_for, tiny_path):
    """The rule-built reference is transformers' Gemma 3 on an unpruned run (the rules are transformers')."""
    engine, path = engine_for("gemma3"), tiny_path("gemma3")
    req = dict(prompt=PROMPTS[2], images=[noise_image(3)])
    res = engine.generate(req["prompt"], images=req["images"], max_new_tokens=8, output_logits=True)
    inputs = engine.prepare(req["prompt"], images=req["images"])
    torch.testing.assert_close(_recompute(path, engine, inputs, res), res.logits, atol=ATOL, rtol=1e-4)


# ---- the tower: per-patch values pooled as the features are ------------------------------------------------

def test_tower_values_pool_like_the_projector(engine_for):
    engine = engine_for("gemma3")
    inputs = engine.prepare("what", images=[noise_image(0), noise_image(1, 56, 40)])
    cfg = engine.model.config
    patches = cfg.vision_config.image_size // cfg.vision_config.patch_size
    side = int(cfg.mm_tokens_per_image ** 0.5)
    kernel = patches // side
    values = torch.randn(2, patches * patches, 5)
    got = engine.adapter.tower_to_tokens(values, inputs)
    blocks = values.reshape(2, side, kernel, side, kernel, 5).mean((2, 4)).reshape(2, side * side, 5)
    assert len(got) == 2
    for g, b in zip(got, blocks):
        torch.testing.assert_close(g, b)


# ---- pan-and-scan: crops are tiles ------------------------------------------------------------------------

def _pan_requests():
    return [dict(prompt=PROMPTS[0], images=[noise_image(0, 40, 90)]),  # wide: crops
            dict(prompt=PROMPTS[1], images=[noise_image(1, 48, 48), noise_image(2, 100, 40)])]  # none; tall: crops


def test_pan_and_scan_crops_are_tiles_of_their_image(pan_engine):
    reqs = _pan_requests()
    inputs = pan_engine.prepare_batch(reqs)
    coords = pan_engine.adapter.image_coords(inputs)
    side = int(pan_engine.model.config.mm_tokens_per_image ** 0.5)
    for b, images in enumerate([[0], [1, 2]]):  # each run of image tokens in the prompt is one tile, in order
        runs = _image_runs(inputs["input_ids"][b], pan_engine.model.config.image_token_id)
        items, offset = [], 0
        for i in images:
            items.append(coords[i][:, 0] + offset)
            offset += int(coords[i][:, 0].max()) + 1
        assert torch.cat(items).tolist() == runs[runs >= 0].tolist()
    tiles = [int(c[:, 0].max()) + 1 for c in coords]
    assert tiles[0] > 1 and tiles[1] == 1 and tiles[2] > 1  # wide and tall images crop; the square one does not
    for c in coords:
        for t in range(int(c[:, 0].max()) + 1):  # each tile: the pooled grid in raster order
            tile = c[c[:, 0] == t]
            assert tile[:, 1].tolist() == [r for r in range(side) for _ in range(side)]
            assert tile[:, 2].tolist() == list(range(side)) * side


def test_pan_and_scan_no_plan_matches_transformers(pan_engine, pan_path):
    reqs = _pan_requests()
    inputs = pan_engine.prepare_batch(reqs)
    ref_tokens, ref_logits = _hf_generate(pan_path, inputs, 5)
    results = pan_engine.generate_batch([dict(r, max_new_tokens=5) for r in reqs], output_logits=True)
    for b, res in enumerate(results):
        n = len(res.token_ids)
        assert res.token_ids == ref_tokens[b, :n].tolist()
        torch.testing.assert_close(res.logits, ref_logits[b, :n], atol=ATOL, rtol=1e-4)


def test_pan_and_scan_pruned_equals_rule_built_recompute(pan_engine, pan_path):
    req = _pan_requests()[0]
    res = pan_engine.generate(req["prompt"], images=req["images"], plan="uniform:keep=0.5;fastv:layer=2,keep=20",
                              max_new_tokens=6, output_logits=True)
    inputs = pan_engine.prepare(req["prompt"], images=req["images"])
    ref = _recompute(pan_path, pan_engine, {k: v for k, v in inputs.items() if k != "num_crops"}, res)
    torch.testing.assert_close(res.logits, ref, atol=ATOL, rtol=1e-4)
    assert ref.argmax(-1).tolist() == res.token_ids
    assert res.stats["visual_tokens"] == int(inputs["input_ids"].eq(pan_engine.model.config.image_token_id).sum())

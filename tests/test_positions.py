"""The position conventions of pruning before the LLM (``positions=original|contiguous``, engine/plan.py).

(a) contiguous on tiny-llava == plain transformers ``generate`` on the pruned prompt itself (the input embeddings
    built here with the kept visual features only, default positions): tokens and logits; the default of a
    pre-LLM pruner is its ``official_positions`` (contiguous for DivPrune)
(b) original == the engine's behaviour before the option: the masked eager reference at original positions
(c) a padded batch with different kept counts, contiguous == the same requests one at a time
(d) the plan parser refuses positions= on an LLM stage, a bad value, and stages that disagree; families that keep
    original positions (M-RoPE, Gemma 3) refuse an explicit contiguous and run a default one as original
"""
import pytest
import torch
from transformers import AutoModelForImageTextToText

import tokensieve
from conftest import noise_image
from test_invariants import assert_matches_recompute

PROMPT = "what is the colour of the circle"
ATOL = 2e-4


def _pruned_prompt_generate(path: str, inputs: dict, kept: torch.Tensor, image_token_id: int, n: int):
    """Plain transformers on the pruned prompt: the text embeddings with only the kept image features at their
    placeholders (the dropped placeholders removed), no position ids given (0..L-1) -> (tokens [n], logits [n, V])."""
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        embeds = model.get_input_embeddings()(ids)
        slots = (ids == image_token_id).nonzero().flatten()
        embeds[slots[kept]] = feats[kept].to(embeds.dtype)
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[slots] = False
        keep[slots[kept]] = True
        embeds = embeds[keep][None]
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, -len(out.logits):].tolist(), torch.stack(out.logits, 1)[0].float()


@pytest.mark.parametrize("plan", ["divprune:keep=0.25", "random:keep=0.5,positions=contiguous"])
def test_a_contiguous_equals_transformers_on_the_pruned_prompt(shipped_engine, plan):
    engine = shipped_engine("tiny-llava")
    image = noise_image(3)
    res = engine.generate(PROMPT, images=[image], plan=plan, max_new_tokens=6, output_logits=True)
    assert tokensieve.Plan.parse(plan).positions == "contiguous"  # DivPrune's default: its official code's
    inputs = engine.prepare(PROMPT, images=[image])
    tokens, logits = _pruned_prompt_generate(tokensieve.shipped.path("tiny-llava"), inputs, res.kept[-1],
                                             engine.model.config.image_token_id, len(res.token_ids))
    assert res.token_ids == tokens[:len(res.token_ids)]
    torch.testing.assert_close(res.logits, logits[:len(res.token_ids)], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("plan", ["divprune:keep=0.25,positions=original",
                                  "random:keep=0.5,positions=original;fastv:layer=2,keep=0.5"])
def test_b_original_keeps_each_tokens_unpruned_position(shipped_engine, plan):
    """original: the pruned run is the unpruned prompt with the dropped tokens hidden (positions unchanged)."""
    engine = shipped_engine("tiny-llava")
    image = noise_image(4)
    res = engine.generate(PROMPT, images=[image], plan=plan, max_new_tokens=6, output_logits=True)
    assert_matches_recompute(engine, tokensieve.shipped.path("tiny-llava"), res, engine.prepare(PROMPT, images=[image]))
    contiguous = engine.generate(PROMPT, images=[image], plan=plan.replace("original", "contiguous"),
                                 max_new_tokens=6, output_logits=True)
    assert not torch.allclose(res.logits[0], contiguous.logits[0], atol=ATOL)  # the option changes the positions


def test_c_padded_batch_with_different_kept_counts_equals_one_at_a_time(engine_for):
    engine = engine_for("llava_next")  # anyres: the image sizes give different token counts, so kept counts
    sizes = [(40, 56), (56, 40), (48, 48)]
    prompts = [PROMPT, "how many red objects are there", "is there a blue square on the left of the picture"]
    reqs = [dict(prompt=p, images=[noise_image(i, *s)], plan="random:keep=0.5,positions=contiguous",
                 max_new_tokens=6) for i, (p, s) in enumerate(zip(prompts, sizes))]
    batched = engine.generate_batch(reqs, output_logits=True)
    assert len({r.stats["kept_tokens"] for r in batched}) > 1
    for req, res in zip(reqs, batched):
        one = engine.generate_batch([req], output_logits=True)[0]
        assert res.token_ids == one.token_ids and res.kept[0].tolist() == one.kept[0].tolist()
        torch.testing.assert_close(res.logits, one.logits, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("plan, match", [
    ("fastv:layer=2,keep=0.25,positions=original", "positions= applies to stages that prune before the LLM"),
    ("divprune:keep=0.25,positions=renumbered", "positions must be one of original, contiguous, got 'renumbered'"),
    ("uniform:keep=0.5,positions=original;divprune:keep=0.5,positions=contiguous", "stages give different positions"),
])
def test_d_parser_refuses_bad_positions(plan, match):
    with pytest.raises(tokensieve.PlanError, match=match):
        tokensieve.Plan.parse(plan)


def test_d_default_is_the_last_pre_llm_pruners_official_convention_and_round_trips():
    from tokensieve.pruners import REGISTRY

    assert REGISTRY["divprune"].official_positions == "contiguous"
    assert tokensieve.Plan.parse("fastv:layer=2,keep=0.5").positions is None  # no stage before the LLM
    plan = tokensieve.Plan.parse("uniform:keep=0.5;fastv:layer=2,keep=0.5")
    assert plan.positions == "contiguous" and not plan.positions_given
    given = tokensieve.Plan.parse("uniform:keep=0.5,positions=original;fastv:layer=2,keep=0.5")
    assert given.positions == "original" and tokensieve.Plan.parse(str(given)) == given
    assert tokensieve.Plan.parse(given.stage_dicts()) == given and given != plan


@pytest.mark.parametrize("family, why", [("qwen2_vl", "M-RoPE"), ("gemma3", "sliding-window")])
def test_d_families_keeping_original_positions_refuse_contiguous(engine_for, family, why):
    engine = engine_for(family)
    with pytest.raises(tokensieve.PlanError, match=f"positions=contiguous does not run on '{family}'.*{why}"):
        engine.check_plan("uniform:keep=0.5,positions=contiguous")
    image = noise_image(5)
    default = engine.generate(PROMPT, images=[image], plan="uniform:keep=0.5", max_new_tokens=3, output_logits=True)
    original = engine.generate(PROMPT, images=[image], plan="uniform:keep=0.5,positions=original", max_new_tokens=3,
                               output_logits=True)
    assert default.token_ids == original.token_ids
    torch.testing.assert_close(default.logits, original.logits, atol=0, rtol=0)

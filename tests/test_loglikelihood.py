"""``Engine.loglikelihood`` (lmms-eval's loglikelihood requests) against plain transformers: the sum of the
continuation's log-probabilities over the whole sequence, computed by the unmodified model with an eager
attention that hides the tokens the plan pruned (tests/reference.py)."""
import pytest
import torch

from conftest import noise_image
from reference import alive_per_layer, extend_inputs, hidden_slots, reference_model

PROMPT = "what is the colour of the circle"


@pytest.mark.parametrize("plan", [None, "uniform:keep=0.5,positions=original", "uniform:keep=0.5,positions=original;fastv:layer=2,keep=0.5"])
@pytest.mark.parametrize("continuation", ["red", " red circle"])
def test_loglikelihood_is_the_references_sum(family, engine_for, tiny_path, plan, continuation):
    engine = engine_for(family)
    image = noise_image(0, 48, 48)
    tokens = engine.processor.tokenizer(continuation, add_special_tokens=False).input_ids
    kept = engine.generate(PROMPT, images=[image], plan=plan, max_new_tokens=1)  # the plan's kept sets
    inputs = engine.prepare(PROMPT, images=[image])
    n_layers = engine.model.config.get_text_config().num_hidden_layers
    hide = hidden_slots(inputs["input_ids"], engine.adapter.visual_token_ids, alive_per_layer(kept, n_layers))
    hide = {j: torch.cat([h, torch.zeros(1, len(tokens), dtype=torch.bool)], 1) for j, h in hide.items()}
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        logp = reference_model(tiny_path(family), hide)(**extend_inputs(inputs, tokens)).logits[0].float().log_softmax(-1)
    steps = logp[n - 1: n - 1 + len(tokens)]
    want = float(steps[torch.arange(len(tokens)), torch.tensor(tokens)].sum())
    greedy = steps.argmax(-1).tolist() == tokens

    got, got_greedy = engine.loglikelihood(PROMPT, continuation, images=[image], plan=plan)
    assert got == pytest.approx(want, abs=1e-3)
    assert got_greedy == greedy


def test_the_greedy_answer_is_greedy(engine_for):
    engine = engine_for("llava")
    image = noise_image(1, 48, 48)
    res = engine.generate(PROMPT, images=[image], max_new_tokens=3)
    text = engine.processor.tokenizer.decode(res.token_ids)
    if engine.processor.tokenizer(text, add_special_tokens=False).input_ids != res.token_ids:
        pytest.skip("this answer does not survive a decode / encode round trip")
    assert engine.loglikelihood(PROMPT, text, images=[image])[1] is True


def test_a_continuation_must_be_text(engine_for):
    import tokensieve
    with pytest.raises(tokensieve.InputError, match="continuation"):
        engine_for("llava").loglikelihood(PROMPT, 3, images=[noise_image(0, 48, 48)])

"""``Engine.stream``: text pieces as they are decoded, then the Result; the same tokens as ``generate``."""
import pytest
import torch

import tokensieve
from conftest import noise_image

PROMPT = "what is the colour of the circle"


@pytest.mark.parametrize("plan", [None, "uniform:keep=0.5", "uniform:keep=0.5;fastv:layer=2,keep=0.5"])
@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "seed": 3, "top_k": 20}], ids=["greedy", "sampled"])
def test_stream_yields_the_tokens_of_generate(family, engine_for, plan, sampling):
    engine = engine_for(family)
    image = noise_image(0)
    want = engine.generate(PROMPT, images=[image], plan=plan, max_new_tokens=8, output_logits=True, **sampling)
    out = list(engine.stream(PROMPT, images=[image], plan=plan, max_new_tokens=8, output_logits=True, **sampling))
    result, pieces = out[-1], out[:-1]
    assert isinstance(result, tokensieve.Result) and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == result.text == want.text
    assert result.token_ids == want.token_ids
    torch.testing.assert_close(result.logits, want.logits)
    assert [k.tolist() for k in result.kept] == [k.tolist() for k in want.kept]
    for key in ("visual_tokens", "kept_tokens", "prefill_flops", "kv_cache_bytes", "new_tokens"):
        assert result.stats[key] == want.stats[key], key


def test_pieces_arrive_before_the_answer_ends(engine_for):
    engine = engine_for("llava")
    seen = []
    stream = engine.stream(PROMPT, images=[noise_image(1)], max_new_tokens=12)
    for piece in stream:
        if isinstance(piece, str):
            seen.append(piece)
        else:
            result = piece
    assert len(result.token_ids) > 2 and len(seen) > 1  # one piece per decoded token, not one at the end


def test_bad_input_is_refused_when_the_stream_is_made(engine_for):
    engine = engine_for("llava")
    with pytest.raises(tokensieve.InputError, match="prompt must be a non-empty string"):
        engine.stream("", images=[noise_image(0)])
    with pytest.raises(tokensieve.PlanError, match="unknown pruner"):
        engine.stream(PROMPT, images=[noise_image(0)], plan="nosuch:keep=2")

"""`fastv` against FastV's official code (pkunlp-icler/FastV), transcribed below as a reference.

Fixed attention at LLaVA-1.5's geometry (576 visual tokens, a 24 x 24 grid, after a 35-token
system prompt) and at the tiny LLaVA's (64 tokens, 8 x 8); then through the engine, where the
reference reads the full eager attention of LLM layer K-1 computed in this test, so a wrong
signal (wrong layer, row, head reduction or slots) fails too.
"""
import pytest
import torch

from conftest import noise_image
from test_pruners import _eager_llm_rows
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, get_pruner

SYS_LENGTH = 35  # LLaVA-1.5's tokens before the image (the official fast_v_sys_length)


def official_fastv_keep(last_layer_attention: torch.Tensor, sys_length: int, image_token_length: int,
                        attention_rank: int) -> torch.Tensor:
    """Reference transcribed from pkunlp-icler/FastV,
    src/transformers/src/transformers/models/llama/modeling_llama.py, LlamaModel.forward, the
    ``USE_FAST_V and FASTV_INPLACE`` branch at ``idx == AGG_LAYER`` (K): ``last_layer_attention`` is
    ``layer_outputs[1]`` of layer K-1, [1, H, S, S] (output_attentions). Heads averaged, batch 0, the
    last token's row, its image slice, top ``attention_rank``; kept = system + top + the text after the
    image, sorted (also the new position_ids). Returns keep_indexs [S'] over the whole sequence."""
    avg = torch.mean(last_layer_attention, dim=1)[0]  # [S, S]
    image_row = avg[-1][sys_length:sys_length + image_token_length]  # [N]
    top = image_row.topk(attention_rank).indices + sys_length
    seq = last_layer_attention.shape[-1]
    keep = torch.cat((torch.arange(sys_length), top, torch.arange(sys_length + image_token_length, seq)))
    return keep.sort().values


def causal_attention(heads: int, seq: int, seed: int, sharp: float = 3.0) -> torch.Tensor:
    """[1, H, S, S] causal softmax of fixed random logits (a stand-in for layer K-1's attention)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, heads, seq, seq, generator=g) * sharp
    logits = logits.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


def assert_no_tie(scores: torch.Tensor, k: int) -> None:
    """The k-th and (k+1)-th largest scores differ clearly: the kept set does not hang on ties / rounding."""
    s = scores.sort(descending=True).values
    if k < s.numel():
        assert float(s[k - 1] - s[k]) > 1e-6 * float(s[0]), "fixture has a near tie at the budget boundary"


@pytest.mark.parametrize("side,budgets", [(24, (192, 128, 64)), (8, (32, 16, 9))])
def test_fastv_pure_matches_official(side, budgets):
    n, text = side * side, 20
    attn = causal_attention(heads=8, seq=SYS_LENGTH + n + text, seed=side)
    row = attn[0, :, -1, SYS_LENGTH:SYS_LENGTH + n]  # [H, N]: what the engine records for the visual slots
    tokens = torch.randn(n, 16, generator=torch.Generator().manual_seed(1))
    for keep in budgets:
        assert_no_tie(row.mean(0), keep)
        official = official_fastv_keep(attn, SYS_LENGTH, n, keep)
        ours = get_pruner("fastv").select(StageInput(tokens=tokens, keep=keep, coords=grid_coords(side, side), attn=row))
        expected = official[(official >= SYS_LENGTH) & (official < SYS_LENGTH + n)] - SYS_LENGTH
        assert ours.keep_idx.tolist() == expected.tolist()
        torch.testing.assert_close(ours.scores, attn.mean(1)[0, -1, SYS_LENGTH:SYS_LENGTH + n])


@pytest.mark.parametrize("layer,keep", [(2, 16), (2, 9), (3, 20)])
def test_fastv_engine_matches_official(engine_for, tiny_path, layer, keep):
    """K = ``layer``: the official code reads layer K-1's full attention (here eager, in this test)."""
    engine, img = engine_for("llava"), noise_image(11)
    prompt = "what is the colour of the circle"
    inputs = engine.prepare(prompt, images=[img])
    ids = inputs["input_ids"][0]
    slots = (ids == engine.model.config.image_token_id).nonzero().flatten()
    sys_length, n = int(slots[0]), slots.numel()
    assert slots.tolist() == list(range(sys_length, sys_length + n))  # one contiguous image, as the official code assumes
    attn = _eager_llm_rows(tiny_path("llava"), inputs, layer=layer - 1, rope=True)[None]  # [1, H, S, S]
    assert_no_tie(attn.mean(1)[0, -1, slots], keep)
    official = official_fastv_keep(attn, sys_length, n, keep)
    expected = (official[(official >= sys_length) & (official < sys_length + n)] - sys_length).tolist()
    for scoring in ("fused", "eager"):
        res = engine.generate(prompt, images=[img], plan=f"fastv:layer={layer},keep={keep},scoring={scoring}",
                              max_new_tokens=1)
        assert res.kept[0].tolist() == expected, scoring
        torch.testing.assert_close(res.scores[0], attn.mean(1)[0, -1, slots], atol=1e-5, rtol=1e-4)

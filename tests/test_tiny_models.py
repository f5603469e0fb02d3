"""The tiny architectures' M-RoPE: the width pairs' frequencies can be raised (standard ``longrope`` factors)
so that the Qwen2 LM can tell columns apart, and the checkpoint keeps them."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

from tokensieve.eval.shapeworld import tiny_models, train_tiny
from tokensieve.testing import make_tokenizer

HEAD_DIM = tiny_models.LM["hidden_size"] // tiny_models.LM["num_attention_heads"]  # 48: 24 rotary pairs


def default_inv_freq() -> torch.Tensor:
    """RoPE's inverse frequencies for theta 10^4, written out: 10^4^(-2i / head_dim)."""
    return torch.tensor([10000.0 ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)])


def width_angle_gap(model, col: int) -> float:
    """Largest rotation difference of any width pair between columns 0 and ``col`` (time, height fixed)."""
    rotary = model.model.language_model.rotary_emb
    pos = torch.tensor([[[5, 5]], [[3, 3]], [[3, 3 + col]]])  # [3 (t, h, w), B, L]
    cos, sin = rotary(torch.zeros(1, 2, HEAD_DIM), pos)  # [B, L, head_dim] after the M-RoPE split
    angle = torch.atan2(sin[0, :, :HEAD_DIM // 2], cos[0, :, :HEAD_DIM // 2])  # [L, pairs]
    return (angle[1] - angle[0]).abs().max().item()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(tuple(train_tiny.vocabulary(n=300)))


def test_default_mrope_cannot_tell_columns_apart_and_the_scale_gives_width_the_heights_frequencies(tok, tmp_path):
    plain, _ = tiny_models.build_qwen2_vl(tok)
    assert torch.allclose(plain.model.language_model.rotary_emb.inv_freq, default_inv_freq())
    assert width_angle_gap(plain, 7) < 0.02  # 8 columns: at most 7 * 0.0022 rad apart

    scale = 10000.0 ** (8 / 24)  # the ratio of the height pairs' frequencies to the width pairs'
    model, proc = tiny_models.build_qwen2_vl(tok, width_rope_scale=scale)
    expected = default_inv_freq()
    expected[16:] = expected[8:16]  # width (pairs 16-23) now rotates like height (pairs 8-15)
    assert torch.allclose(model.model.language_model.rotary_emb.inv_freq, expected, rtol=1e-5)
    assert width_angle_gap(model, 7) > 0.3
    assert model.model.language_model.rotary_emb.attention_scaling == 1.0  # attention unscaled

    model.save_pretrained(tmp_path)  # a standard checkpoint: from_pretrained rebuilds the same rotary
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert torch.allclose(loaded.model.language_model.rotary_emb.inv_freq, expected, rtol=1e-5)


def test_nonpositive_width_rope_scale_is_one_clear_error():
    with pytest.raises(ValueError, match="width_rope_scale must be > 0"):
        tiny_models.mrope_parameters(0.0)

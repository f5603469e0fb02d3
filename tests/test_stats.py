"""Metering: the stats of a Result against independent counts."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import noise_image
from tokensieve.engine import metering


def test_stats_fields_and_kv_lengths(engine_for):
    engine = engine_for("llava")
    res = engine.generate("what is the colour", images=[noise_image(0)], plan="fastv:layer=2,keep=8", max_new_tokens=4)
    s = res.stats
    for key in ["visual_tokens", "kept_tokens", "per_layer_kv_len", "kv_cache_bytes", "prefill_flops", "prefill_s",
                "decode_s", "new_tokens"]:
        assert key in s
    n_prompt = engine.prepare("what is the colour", images=[noise_image(0)])["input_ids"].shape[1]
    fed = len(res.token_ids) - 1
    assert s["visual_tokens"] == 64 and s["kept_tokens"] == 8
    assert s["per_layer_kv_len"] == [n_prompt + fed] * 2 + [n_prompt - 56 + fed] * 2
    cfg = engine.model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert s["kv_cache_bytes"] == sum(s["per_layer_kv_len"]) * 2 * cfg.num_key_value_heads * head_dim * 4


def test_prefill_flops_formula_matches_flop_counter(engine_for):
    """The analytic count for a decoder layer equals torch's FLOP counter on the real layer (matmuls).

    SDPA runs on its math backend: torch 2.14's counter has no formula for the fused CPU kernel (counts 0)."""
    engine = engine_for("llava")
    cfg = engine.model.config.text_config
    layer = engine.model.model.language_model.layers[0]
    n = 37
    x = torch.randn(1, n, cfg.hidden_size)
    pos = torch.arange(n)[None]
    cos_sin = engine.model.model.language_model.rotary_emb(x, pos)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        layer(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
    assert fc.get_total_flops() == metering.decoder_layer_flops(n, cfg)


def test_pruning_reduces_prefill_flops(engine_for):
    engine = engine_for("llava")
    full = engine.generate("what", images=[noise_image(0)], max_new_tokens=1).stats["prefill_flops"]
    half = engine.generate("what", images=[noise_image(0)], plan="uniform:keep=0.5", max_new_tokens=1).stats["prefill_flops"]
    assert half < full


def test_vision_flops_match_flop_counter_and_vision_stages(engine_for):
    engine = engine_for("llava")
    vcfg = engine.model.config.vision_config
    tower = engine.model.model.vision_tower
    x = torch.randn(1, 65, vcfg.hidden_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        tower.encoder.layers[0](x, None)
    assert fc.get_total_flops() == metering.vision_flops([[65]], vcfg)
    full = engine.generate("what", images=[noise_image(0)], max_new_tokens=1).stats["vision_flops"]
    assert full == metering.vision_flops([[65]] * 3, vcfg)
    cut = engine.generate("what", images=[noise_image(0)], plan="uniform:where=vision,layer=1,keep=16",
                          max_new_tokens=1).stats["vision_flops"]
    assert cut == metering.vision_flops([[65], [17], [17]], vcfg)

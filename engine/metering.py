"""Analytic cost model. FLOPs count a multiply-add as 2 FLOPs.

Language model, per decoder layer with n tokens (prefill; the attention matrix is counted
in full, n x n, as FastV does; d hidden, m FFN width, h_q / h_kv heads of width d_h):
    q and o projections   2 * 2n * d * (h_q * d_h)
    k and v projections   2 * 2n * d * (h_kv * d_h)
    scores and weighted V 2 * 2 * n^2 * h_q * d_h
    SwiGLU MLP            3 * 2n * d * m          (three matrices: gate, up, down)
plus the LM head for the one token whose logits prefill returns: 2 * d * vocab.
The vision tower is counted separately (``vision_flops``), ViT style, with a 2-matrix MLP.
"""
from __future__ import annotations


def decoder_layer_flops(n: int, cfg) -> int:
    d, m = cfg.hidden_size, cfg.intermediate_size
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    dh = getattr(cfg, "head_dim", None) or d // hq
    return 4 * n * d * hq * dh + 4 * n * d * hkv * dh + 4 * n * n * hq * dh + 6 * n * d * m


def prefill_flops(tokens_per_layer: list[int], cfg) -> int:
    """tokens_per_layer: the number of tokens each decoder layer processes in prefill."""
    return sum(decoder_layer_flops(n, cfg) for n in tokens_per_layer) + 2 * cfg.hidden_size * cfg.vocab_size


def vision_flops(seqs_per_layer: list[list[int]], vcfg) -> int:
    """seqs_per_layer: per encoder layer, the length of every sequence (image / tile) it attends over.

    Per sequence of n tokens: 8nd^2 (q, k, v, o) + 4n^2 d (scores, weighted V) + 4ndm (2-matrix MLP).
    Windowed attention (Qwen2.5-VL) is counted as full attention over the image.
    """
    d = getattr(vcfg, "embed_dim", None) or vcfg.hidden_size
    m = getattr(vcfg, "intermediate_size", None) or int(d * getattr(vcfg, "mlp_ratio", 4))
    return sum(8 * n * d * d + 4 * n * n * d + 4 * n * d * m for seqs in seqs_per_layer for n in seqs)


def visual_tokens_per_layer(stages, kept: list, n_visual: int, n_layers: int, steps: dict | None = None) -> list[int]:
    """Visual tokens each decoder layer sees in prefill, given the stages and their kept sets (``steps``: layer ->
    tokens entering it, from the steps of an LLM stage of several steps)."""
    alive = n_visual
    at_layer = dict(steps or {})
    for stage, k in zip(stages, kept):
        if stage.where == "llm":
            at_layer[stage.layer] = k.numel()
        else:
            alive = k.numel()
    out = []
    for layer in range(n_layers):
        alive = at_layer.get(layer, alive)
        out.append(alive)
    return out


def kv_cache_bytes(per_layer_len: list[int], cfg, element_size: int) -> int:
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    return sum(2 * n * hkv * dh * element_size for n in per_layer_len)

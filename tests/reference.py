"""Independent references for the invariant tests: plain transformers, eager attention written here.

``masked_reference_logits`` runs the *unmodified* transformers model (no tokensieve code) over
the whole sequence without a cache, with a test-local eager attention function that hides
the pruned visual tokens from every layer at or after the layer where they were pruned.
Hiding a token from all later attention is mathematically the same as deleting it there.
"""
import torch
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForImageTextToText
from transformers.masking_utils import sdpa_mask

REF_ATTN = "tokensieve_test_reference"


def _eager(hidden_by_layer: dict):
    def attn(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
        scores = q.float() @ k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
        sq, sk = q.shape[2], k.shape[2]
        allowed = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)[None, None] if mask is None else mask.bool()
        hidden = hidden_by_layer.get(module.layer_idx)
        if hidden is not None:
            allowed = allowed & ~hidden[:, None, None, :sk]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        return (probs @ v).transpose(1, 2).to(q.dtype), None

    return attn


def reference_model(path: str, hidden_by_layer: dict):
    AttentionInterface.register(REF_ATTN, _eager(hidden_by_layer))
    AttentionMaskInterface.register(REF_ATTN, sdpa_mask)
    return AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation={"text_config": REF_ATTN, "vision_config": "sdpa", "": "sdpa"}).eval()


def hidden_slots(input_ids: torch.Tensor, visual_ids, kept_per_layer: list) -> dict:
    """For each LLM layer, [1, L] bool of visual slots pruned before it (kept_per_layer[j]: alive originals)."""
    slots = torch.isin(input_ids[0], torch.tensor(visual_ids)).nonzero().flatten()
    out = {}
    for layer, alive in enumerate(kept_per_layer):
        hide = torch.zeros(1, input_ids.shape[1], dtype=torch.bool)
        dead = torch.ones(slots.numel(), dtype=torch.bool)
        dead[alive] = False
        hide[0, slots[dead]] = True
        out[layer] = hide
    return out


def alive_per_layer(result, n_layers: int) -> list:
    """For each LLM layer, the original visual indices still alive there after a result's stages."""
    alive = [torch.arange(result.stats["visual_tokens"])] * n_layers
    for stage, kept in zip(result.plan.stages, result.kept):
        start = stage.layer if stage.where == "llm" else 0
        alive = alive[:start] + [kept] * (n_layers - start)
    return alive


def extend_inputs(inputs: dict, new_tokens: list[int]) -> dict:
    """Append generated tokens to a batch-of-one processor output (text side only)."""
    out = dict(inputs)
    extra = torch.tensor([new_tokens], dtype=torch.long)
    out["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    return out


def clip_tower_attention(tower, pixel_values, store=None):
    """Run a CLIP vision ``tower`` on ``pixel_values`` with hooks that compute each layer's softmax
    attention from its q_proj / k_proj, here and not by the model: returns (attention per layer
    [B, H, S, S], the tower's hidden states); with ``store``, also each layer's keys and values
    [B, H, S, d] under "k" / "v"."""
    attn = []

    def hook(mod, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        b, s, _ = x.shape
        q = mod.q_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)
        k = mod.k_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)
        attn.append(torch.softmax(q @ k.transpose(-1, -2) * mod.scale, -1))
        if store is not None:
            store.setdefault("k", []).append(k)
            store.setdefault("v", []).append(mod.v_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2))

    hooks = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in tower.encoder.layers]
    try:
        with torch.no_grad():
            hidden = tower(pixel_values, output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    return attn, hidden

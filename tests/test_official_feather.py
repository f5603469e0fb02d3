"""`feather` against a reference transcribed from the official code path, on fixed queries and keys at
LLaVA-1.5 geometry (24 x 24 = 576 patches) and the tiny models' (8 x 8 = 64), both stages, and through
the engine on the tiny LLaVA (RoPE-free attention computed eagerly here), so the recorded signal
(``last_query_norope``) is checked too."""
import math

import pytest
import torch
from conftest import noise_image
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, get_pruner

# markendo/FEATHER, vlm-evaluation/scripts/eval_feather.sh: --fastv_k "[8, 16]" --fastv_ratio 0.7
# --fastv_predefined_mask "no_rope_s=3"; FastVLlamaModel.__init__: self.fastV_ratio = 1 - config.fastv_ratio
RATIO = 1 - 0.7
STRIDE = 3


def official_scores(q_last: torch.Tensor, k_img: torch.Tensor) -> torch.Tensor:
    """``calculate_attention_weight`` (prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py) with
    fastV_use_rope=False: q_last [H, d] (the last token's query), k_img [H, N, d] (the image tokens' keys), no
    rotary embedding on either -> softmax over the image keys only of q.k / sqrt(d), mean over heads: [N]."""
    w = (q_last[:, None] @ k_img.transpose(-1, -2)) / math.sqrt(q_last.shape[-1])  # [H, 1, N]
    return torch.softmax(w, dim=-1, dtype=torch.float32).mean(dim=0)[0]


def official_first_stage(score: torch.Tensor) -> torch.Tensor:
    """``FastVLlamaModel.forward``, feather branch at fastV_k[0]: topk(int(N * ratio)) united with
    grid[::stride, ::stride] of the square grid, torch.unique (sorted): kept image positions."""
    n = score.numel()
    top = score.topk(int(n * RATIO)).indices
    side = int(math.sqrt(n))
    strided = torch.arange(n).reshape(side, side)[::STRIDE, ::STRIDE].flatten()
    return torch.unique(torch.cat((top, strided)), sorted=True)


def official_second_stage(score: torch.Tensor, n_orig: int) -> torch.Tensor:
    """The same at fastV_k[1]: topk(int(N_orig * ratio * ratio)) of the survivors (positions among them)."""
    return score.topk(int(n_orig * (RATIO * RATIO))).indices.sort().values


def engine_row(q_last, k_all, vis):
    """What the engine records for ``last_query_norope``: the last token's softmax over *every* key
    (system, image, text), then restricted to the image tokens: [H, N]."""
    w = (q_last[:, None] @ k_all.transpose(-1, -2))[:, 0] / math.sqrt(q_last.shape[-1])
    return torch.softmax(w, dim=-1)[:, vis]


def fixed_qk(n, seed, heads=4, d=16, prefix=5, text=9):
    """RoPE-free query of the last token [H, d] and keys of every token [H, S, d]; image tokens at prefix.."""
    g = torch.Generator().manual_seed(seed)
    s = prefix + n + text
    q = torch.randn(heads, d, generator=g) * 1.5
    k = torch.randn(heads, s, d, generator=g) * (0.5 + torch.rand(heads, s, 1, generator=g))
    return q, k, torch.arange(prefix, prefix + n)


@pytest.mark.parametrize("side", [24, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_stages_against_official(side, seed):
    n = side * side
    q, k, vis = fixed_qk(n, seed)
    score = official_scores(q, k[:, vis])
    first = official_first_stage(score)
    sel = get_pruner("feather").select(StageInput(tokens=torch.zeros(n, 4), keep=first.numel(),
                                                  coords=grid_coords(side, side), attn=engine_row(q, k, vis)))
    assert sel.keep_idx.tolist() == first.tolist()
    torch.testing.assert_close(sel.scores, score, atol=1e-6, rtol=1e-5)

    q2, k2, _ = fixed_qk(n, seed + 100)  # layer 15's query and keys: over the survivors only
    alive = torch.cat([torch.arange(vis[0]), vis[first], torch.arange(vis[-1] + 1, k2.shape[1])])
    k2 = k2[:, alive]
    vis2 = torch.arange(int(vis[0]), int(vis[0]) + first.numel())
    score2 = official_scores(q2, k2[:, vis2])
    second = official_second_stage(score2, n)
    sel2 = get_pruner("feather").select(StageInput(tokens=torch.zeros(first.numel(), 4), keep=second.numel(),
                                                   coords=grid_coords(side, side)[first], attn=engine_row(q2, k2, vis2),
                                                   options={"stride": 0}))
    assert sel2.keep_idx.tolist() == second.tolist()
    assert second.numel() == {576: 51, 64: 5}[n]


def test_first_stage_grid_is_every_third_row_and_column():
    q, k, vis = fixed_qk(576, 7)
    sel = get_pruner("feather").select(StageInput(tokens=torch.zeros(576, 4), keep=100,
                                                  coords=grid_coords(24, 24), attn=engine_row(q, k, vis)))
    grid = {r * 24 + c for r in range(0, 24, 3) for c in range(0, 24, 3)}
    assert len(grid) == 64 and grid <= set(sel.keep_idx.tolist())
    score = official_scores(q, k[:, vis])
    rest = [i for i in score.argsort(descending=True).tolist() if i not in grid][:36]
    assert sorted(grid | set(rest)) == sel.keep_idx.tolist()


def _eager_qk_norope(path, inputs, layers):
    """Per LLM layer: RoPE-free queries and keys [H, S, d] of the unpruned prefill (batch of 1), from
    q_proj / k_proj of the normed hidden states entering self-attention (GQA keys repeated)."""
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    out, hooks = {}, []
    for layer in layers:
        def hook(mod, args, kwargs, layer=layer):
            x = kwargs["hidden_states"]
            b, s, _ = x.shape
            q = mod.q_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)[0]
            k = mod.k_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)[0]
            out[layer] = (q, k.repeat_interleave(q.shape[0] // k.shape[0], 0))
        hooks.append(model.model.language_model.layers[layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return out


def test_engine_two_stages_against_official(engine_for, tiny_path):
    """Stages before layers 2 and 3 read layers 1 and 2 (the engine's K-1): kept sets and scores as official.

    The hidden states entering layer 2 of the kept tokens are those of the unpruned run (pruning only drops
    rows before layer 2), so layer 2's official scores over the survivors come from the same eager pass."""
    engine, img = engine_for("llava"), noise_image(11)
    prompt = "what is the colour of the big circle"
    inputs = engine.prepare(prompt, images=[img])
    qk = _eager_qk_norope(tiny_path("llava"), inputs, [1, 2])
    slots = (inputs["input_ids"][0] == engine.model.config.image_token_id).nonzero().flatten()
    q1, k1 = qk[1]
    score1 = official_scores(q1[:, -1], k1[:, slots])
    first = official_first_stage(score1)
    q2, k2 = qk[2]
    score2 = official_scores(q2[:, -1], k2[:, slots[first]])
    second = first[official_second_stage(score2, slots.numel())]
    plan = f"feather:layer=2,keep={first.numel()};feather:layer=3,keep={int(64 * RATIO * RATIO)},stride=0"
    res = engine.generate(prompt, images=[img], plan=plan, max_new_tokens=1)
    assert res.kept[0].tolist() == first.tolist()
    assert res.kept[1].tolist() == second.tolist()
    torch.testing.assert_close(res.scores[0], score1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.scores[1], score2, atol=1e-5, rtol=1e-4)

"""`dart` against a reference transcribed from the official code path (ZichenWen1/DART), on fixed signals at
LLaVA-1.5 geometry (35 system tokens, 576 visual tokens, then the question) at the official budgets M = 192 /
128 / 64 (kept 196 / 132 / 68) and at the tiny models' (64 tokens), and through the engine on the shipped
tiny-llava and tiny-qwen2-vl, where this test computes layer K-1's keys (hooks on the model's own projections
and rotary tables) and the hidden states entering layer K through the model's own final norm."""
import sys
import types

import pytest
import torch
from transformers import AutoModelForImageTextToText

import tokensieve
from conftest import noise_image
from tokensieve import shipped
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.engine.errors import PlanError
from tokensieve.engine.plan import Plan
from tokensieve.pruners import StageInput, get_pruner
from tokensieve.pruners import dart as dp


def official_get_retained_image_token(config, last_layer_state: torch.Tensor, K_states: torch.Tensor) -> torch.Tensor:
    """The official selection, line for line.

    Transcribed from ZichenWen1/DART, ``llava/model/language_model/modeling_llama_self.py``,
    ``get_retained_image_token`` (LLaVA-1.5 path: ``config.text_length`` None; read in the fork xqy1111111/DART at
    commit 0247657060a4). ``last_layer_state`` [1, S, D]:
    layer K-1's output through ``self.norm``; ``K_states`` [1, H, S, d]: layer K-1's keys (``layer_outputs[-2]``,
    RoPE applied). Returns the retained image tokens' sequence positions (unsorted: the set's order)."""
    DART_config = config.DART_config
    image_token_start_index = DART_config['image_token_start_index']
    image_token_length = DART_config['image_token_length']
    MAX_NUM_TRUNCTION = DART_config['max_num_trunction']

    pivot_image_token = DART_config['pivot_image_token']
    pivot_text_token = DART_config['pivot_text_token']
    TOKEN_TOPK = int(MAX_NUM_TRUNCTION // (pivot_image_token + pivot_text_token))

    device = last_layer_state.device

    K_states = K_states.permute(0, 2, 1, 3).reshape(K_states.shape[0], K_states.shape[2], -1)

    k_states_image_token = K_states[0][image_token_start_index:image_token_start_index + image_token_length, :]
    k_states_query_token = K_states[0][image_token_start_index + image_token_length:, :]

    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_L1_norm = torch.norm(k_states_query_token, p=1, dim=-1)

    image_indices = (k_states_image_token_L1_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (k_states_query_token_L1_norm.topk(pivot_text_token).indices
                     + image_token_start_index + image_token_length).tolist()
    indices_set = set(image_indices + query_indices)

    tmp_set = indices_set.copy()

    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length))
    valid_indices.difference_update(image_indices)

    for item in list(tmp_set):
        valid_indices_list = list(valid_indices)
        valid_vectors = last_layer_state[0][valid_indices_list, :]

        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)

        top_k_indices = cos_sim.topk(TOKEN_TOPK).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices.tolist()]

        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)

    indices_set.difference_update(query_indices)

    retained_image_tokens_index = torch.tensor(list(indices_set), device=device)

    return retained_image_tokens_index


def official_kept(normed, keys, start, n, budget, p_img=4, p_txt=4) -> list[int]:
    """normed [S, D], keys [H, S, d] -> the official kept visual tokens, as indices into the n, ascending."""
    config = types.SimpleNamespace(DART_config=dict(
        K=2, image_token_start_index=start, image_token_length=n, max_num_trunction=budget,
        pivot_image_token=p_img, pivot_text_token=p_txt))
    kept = official_get_retained_image_token(config, normed[None], keys[None])
    return sorted(int(i) - start for i in kept)


def ours(normed, keys, start, n, keep, side, **options):
    """The pruner on the n visual tokens at [start, start + n), the text after them."""
    flat = keys.permute(1, 0, 2).flatten(1)  # [S, H*d]
    seq = normed.shape[0]
    vis, text = torch.arange(start, start + n), torch.arange(start + n, seq)
    inp = StageInput(tokens=normed[vis], keep=keep, coords=grid_coords(side, side), options=options,
                     llm_keys=flat[vis], text_keys=flat[text], normed=normed[vis], text_normed=normed[text],
                     positions=vis, text_positions=text)
    return get_pruner("dart").select(inp)


def fixed_signals(start, n, n_text, seed, heads=8, head_dim=16, dim=64):
    """Normed hidden states [S, D] (clusters of near duplicates, as images give) and keys [H, S, d] with uneven
    norms, for a prompt of ``start`` tokens, ``n`` visual tokens and ``n_text`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    seq = start + n + n_text
    centres = torch.randn(12, dim, generator=g)
    normed = centres[torch.randint(0, 12, (seq,), generator=g)] + 0.6 * torch.randn(seq, dim, generator=g)
    keys = torch.randn(heads, seq, head_dim, generator=g) * (0.8 + 0.4 * torch.rand(1, seq, 1, generator=g))
    return normed, keys


LLAVA = (35, 576, 40, 24)  # system tokens, visual tokens, text tokens, grid side
TINY = (5, 64, 12, 8)


@pytest.mark.parametrize("geometry,budget,keep,p_img,p_txt", [
    (LLAVA, 192, 196, 4, 4), (LLAVA, 128, 132, 4, 4), (LLAVA, 64, 68, 4, 4), (LLAVA, 64, 72, 8, 8),
    (TINY, 16, 20, 4, 4), (TINY, 8, 12, 4, 4), (TINY, 16, 18, 2, 2), (TINY, 24, 32, 8, 0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_on_fixed_signals(geometry, budget, keep, p_img, p_txt, seed):
    """keep = pivot_image + (pivots) * (M // pivots): the official run's count, and the same set."""
    start, n, n_text, side = geometry
    normed, keys = fixed_signals(start, n, n_text, seed)
    want = official_kept(normed, keys, start, n, budget, p_img, p_txt)
    sel = ours(normed, keys, start, n, keep, side, pivot_image=p_img, pivot_text=p_txt)
    assert len(want) == keep and sel.keep_idx.tolist() == want
    flat = keys.permute(1, 0, 2).flatten(1)
    torch.testing.assert_close(sel.scores, flat[start:start + n].abs().sum(-1))  # key L1 norm


def test_defaults_are_the_official_four_and_four():
    normed, keys = fixed_signals(*LLAVA[:3], seed=3)
    assert ours(normed, keys, 35, 576, 132, 24).keep_idx.tolist() == official_kept(normed, keys, 35, 576, 128)
    assert get_pruner("dart").default_layer == 2  # the official pruned_layer K


def test_a_keep_the_official_code_cannot_reach():
    """keep = 70 (66 = 8 x 8 + 2 to take): the first two pivots visited take 9, the others 8; every image
    pivot is kept."""
    normed, keys = fixed_signals(*LLAVA[:3], seed=0)
    sel = ours(normed, keys, 35, 576, 70, 24)
    pivots = keys.permute(1, 0, 2).flatten(1)[35:611].abs().sum(-1).topk(4).indices.tolist()
    assert sel.keep_idx.numel() == 70 and set(pivots) <= set(sel.keep_idx.tolist())
    assert dp.take_counts(70, 4, 8) == [9, 9, 8, 8, 8, 8, 8, 8]
    assert ours(normed, keys, 35, 576, 3, 24).keep_idx.tolist() == sorted(pivots[:3])  # keep < pivots


@pytest.mark.parametrize("broken", ["l2_norm", "position_order", "most_similar"])
def test_a_broken_method_fails_the_comparison(monkeypatch, broken):
    """The comparison can fail: pivots by the keys' L2 norm, pivots visited in position order instead of the
    set's, or the most (not least) similar tokens taken."""
    if broken == "l2_norm":
        monkeypatch.setattr(dp, "key_l1", lambda k: torch.norm(k, p=2, dim=-1))
    elif broken == "position_order":
        monkeypatch.setattr(dp, "visit_order", lambda img, txt: sorted(img + txt))
    else:
        cos = torch.nn.functional.cosine_similarity
        monkeypatch.setattr(dp, "F", types.SimpleNamespace(cosine_similarity=lambda a, b, dim: -cos(a, b, dim=dim)))
    differs = []
    for seed in range(3):
        normed, keys = fixed_signals(*LLAVA[:3], seed=seed)
        differs.append(ours(normed, keys, 35, 576, 132, 24).keep_idx.tolist()
                       != official_kept(normed, keys, 35, 576, 128))
    assert any(differs) if broken == "position_order" else all(differs)


def test_acts_only_inside_the_llm():
    with pytest.raises(PlanError, match="acts at llm"):
        Plan.parse("dart:where=pre_llm,keep=20")


# ---- through the engine on the shipped tiny models ------------------------------------------------

def reference_signals(name, inputs, layer):
    """Of the model loaded here: layer ``layer - 1``'s keys [H, S, d] (its own k_proj and rotary tables, KV heads
    repeated) and the hidden states entering ``layer`` [S, D] through its own final norm."""
    model = AutoModelForImageTextToText.from_pretrained(shipped.path(name)).eval()
    lm, got = model.model.language_model, {}
    attn = lm.layers[layer - 1].self_attn
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the family's own rotary function

    def keys_hook(mod, args, kwargs):
        x = kwargs["hidden_states"]
        b, s, _ = x.shape
        q = mod.q_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)
        k = mod.k_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)
        _, k = rotary(q, k, *kwargs["position_embeddings"])
        got["keys"] = k.repeat_interleave(q.shape[1] // k.shape[1], 1)[0]

    def hidden_hook(mod, args, kwargs):
        got["hidden"] = (args[0] if args else kwargs["hidden_states"])[0]

    handles = [attn.register_forward_pre_hook(keys_hook, with_kwargs=True),
               lm.layers[layer].register_forward_pre_hook(hidden_hook, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs)
            normed = lm.norm(got["hidden"])
    finally:
        for h in handles:
            h.remove()
    return normed, got["keys"]


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
@pytest.mark.parametrize("layer,budget,p_img,p_txt", [(2, 16, 4, 4), (1, 8, 4, 4), (3, 8, 2, 2)])
def test_engine_matches_official_on_shipped_models(shipped_engine, name, layer, budget, p_img, p_txt):
    """keep = p_img + (p_img + p_txt) * (M // (p_img + p_txt)): the official run with M = ``budget``."""
    engine, img, prompt = shipped_engine(name), noise_image(4), "what is the colour of the circle"
    inputs = engine.prepare(prompt, images=[img])
    ids = inputs["input_ids"][0]
    slots = (ids == engine.model.config.image_token_id).nonzero().flatten()
    start, n = int(slots[0]), slots.numel()
    assert slots.tolist() == list(range(start, start + n))  # one contiguous image, as the official code assumes
    normed, keys = reference_signals(name, inputs, layer)
    want = official_kept(normed, keys, start, n, budget, p_img, p_txt)
    keep = p_img + (p_img + p_txt) * (budget // (p_img + p_txt))
    res = engine.generate(prompt, images=[img], plan=f"dart:layer={layer},keep={keep},pivot_image={p_img},"
                          f"pivot_text={p_txt}", max_new_tokens=1)
    assert len(want) == keep and res.kept[0].tolist() == want
    flat = keys.permute(1, 0, 2).flatten(1)
    torch.testing.assert_close(res.scores[0], flat[start:start + n].abs().sum(-1), atol=1e-4, rtol=1e-4)


def test_padded_batch_equals_one_at_a_time(family, engine_for):
    """Per request in a left-padded batch: its own keys, normed states, text tokens and prompt positions, so every
    family's batch keeps (and scores) what each request alone does."""
    engine = engine_for(family)
    reqs = [{"prompt": "what is the colour of the big circle", "images": [noise_image(1, 40, 56)]},
            {"prompt": "how many", "images": [noise_image(2, 56, 40)]}]
    plan = "dart:layer=2,keep=0.3"
    batch = engine.generate_batch([dict(r, plan=plan, max_new_tokens=1) for r in reqs], batch_size=2)
    for req, res in zip(reqs, batch):
        alone = engine.generate(req["prompt"], images=req["images"], plan=plan, max_new_tokens=1)
        assert res.kept[0].tolist() == alone.kept[0].tolist()
        torch.testing.assert_close(res.scores[0], alone.scores[0], atol=1e-5, rtol=1e-4)

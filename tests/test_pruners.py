"""Every pruner of the library: interface properties, and its kept set against an independent,
plain reference computed here from the paper's definition (attention from eager computations
in this file on a tiny model, never from the code under test)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import noise_image
from tokensieve import PlanError
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import REGISTRY, StageInput, get_pruner

N, H, T = 64, 4, 5


def full_input(keep, seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    return StageInput(tokens=torch.randn(N, 8, generator=g), keep=keep, coords=grid_coords(8, 8),
                      attn=torch.softmax(torch.randn(H, N, generator=g), -1), options=options,
                      tower_score=torch.rand(N, 6, generator=g).abs(),  # flowcut: 2 layers x 3 channels
                      keys=torch.randn(N, 4, generator=g), text_attn=torch.softmax(torch.randn(H, T, N, generator=g), -1),
                      sizes=torch.ones(N), priority=torch.randn(N, generator=g),
                      instruction=torch.randn(T, 8, generator=g))


def with_llm_token_signals(inp, seed=0):
    """The ``llm.keys`` / ``llm.normed`` / ``llm.positions`` fields (dart): T text tokens after the N visual."""
    g = torch.Generator().manual_seed(seed)
    inp.llm_keys, inp.text_keys = torch.randn(N, 12, generator=g), torch.randn(T, 12, generator=g)
    inp.normed, inp.text_normed = torch.randn(N, 8, generator=g), torch.randn(T, 8, generator=g)
    inp.positions, inp.text_positions = torch.arange(3, 3 + N), torch.arange(3 + N, 3 + N + T)
    return inp


def run(name, inp):
    with_llm_token_signals(inp)
    if name != "flowcut":  # flowcut (replayed before the LLM) reads (layers x 3) channels; the rest one score
        inp.tower_score = inp.tower_score[:, 0]
    return get_pruner(name).select(inp)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("keep", [1, 9, 16, N])
def test_interface_properties(name, keep):
    sel = run(name, full_input(keep))
    idx = sel.keep_idx.tolist()
    assert len(idx) == keep and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < N
    if sel.tokens is not None:
        assert sel.tokens.shape == (keep, 8)
    if sel.groups is not None:
        assert sel.groups.shape == (N,) and sel.groups[sel.keep_idx].tolist() == list(range(keep))
    if keep == N:  # keep-everything is the identity, features untouched
        assert idx == list(range(N))
        if sel.tokens is not None:
            torch.testing.assert_close(sel.tokens, full_input(keep).tokens)
    again = run(name, full_input(keep))
    assert torch.equal(again.keep_idx, sel.keep_idx)  # deterministic


# ---- pure references ------------------------------------------------------------------------

def test_divprune_is_greedy_max_min():
    x = full_input(10).tokens
    d = 1 - F.cosine_similarity(x[:, None], x[None], dim=-1)
    nn = [min(float(d[i, j]) for j in range(N) if j != i) for i in range(N)]
    chosen = [max(range(N), key=lambda i: nn[i])]
    while len(chosen) < 10:
        chosen.append(max((i for i in range(N) if i not in chosen), key=lambda i: min(float(d[i, j]) for j in chosen)))
    assert get_pruner("divprune").select(full_input(10)).keep_idx.tolist() == sorted(chosen)


def test_tome_one_round_matches_bipartite_definition():
    inp = full_input(N - 7)
    inp.keys = None  # metric = the tokens
    sel = get_pruner("tome").select(inp)
    x = inp.tokens
    a, b = list(range(0, N, 2)), list(range(1, N, 2))
    sim = F.cosine_similarity(x[a][:, None], x[b][None], dim=-1)
    best, match = sim.max(1)
    order = sorted(range(len(a)), key=lambda i: -float(best[i]))[:7]
    merged_src = {a[i]: b[int(match[i])] for i in order}
    assert sel.keep_idx.tolist() == [i for i in range(N) if i not in merged_src]
    for dst in set(merged_src.values()):
        group = [dst] + [s for s, d in merged_src.items() if d == dst]
        pos = sel.keep_idx.tolist().index(dst)
        torch.testing.assert_close(sel.tokens[pos], x[group].mean(0))
        assert all(int(sel.groups[g]) == pos for g in group)


def test_pool_is_average_pooling():
    x = torch.arange(64.).view(64, 1)
    sel = get_pruner("pool").select(StageInput(tokens=x, keep=16, coords=grid_coords(8, 8)))
    expected = x.view(4, 2, 4, 2).mean(dim=(1, 3)).flatten()
    torch.testing.assert_close(sel.tokens.flatten(), expected)


def test_sparsevlm_raters():
    inp = full_input(10, recycle=0)
    inp.raters = torch.tensor([True, False, True, False, False])  # chosen by the engine from the input embeddings
    sel = get_pruner("sparsevlm").select(inp)
    score = inp.text_attn.mean(0)[[0, 2]].mean(0)  # head mean, then the raters' mean
    assert sel.keep_idx.tolist() == sorted(torch.topk(score, 10).indices.tolist())
    rec = get_pruner("sparsevlm").select(full_input(10))  # 8 by score + 2 clusters of the best dropped ones
    assert rec.groups is not None and int((rec.groups >= 0).sum()) > 10  # recycled groups absorb pruned tokens


def test_feather_stride_samples():  # the official grid[::3, ::3], then the best others (test_official_feather.py)
    inp = full_input(16)
    sel = get_pruner("feather").select(inp)
    grid = [r * 8 + c for r in (0, 3, 6) for c in (0, 3, 6)]
    score = (inp.attn / inp.attn.sum(-1, keepdim=True)).mean(0)  # softmax over the visual tokens only, head mean
    rest = [i for i in score.argsort(descending=True).tolist() if i not in grid][:7]
    assert sel.keep_idx.tolist() == sorted(grid + rest)
    assert get_pruner("feather").select(full_input(16, stride=0)).keep_idx.tolist() == _topk(score, 16)


# ---- against eager attention on a tiny model --------------------------------------------------

def _eager_tower(path, pixel_values, store=None):
    """Per CLIP layer: softmax attention [H, S, S] of image 0, computed here from q_proj/k_proj
    (and, in ``store``, that layer's keys and values [H, S, d])."""
    from transformers import AutoModelForImageTextToText
    from reference import clip_tower_attention
    tower = AutoModelForImageTextToText.from_pretrained(path).eval().model.vision_tower
    kv = {} if store is not None else None
    attn, _ = clip_tower_attention(tower, pixel_values, kv)
    if store is not None:
        for key, per_layer in kv.items():
            store.setdefault(key, []).extend(t[0] for t in per_layer)
    return [a[0] for a in attn]


def _topk(scores, k):
    return sorted(torch.topk(scores, k).indices.tolist())


def test_cls_vtc_and_ensemble_against_eager(engine_for, tiny_path):
    engine, img = engine_for("llava"), noise_image(2)
    attn = _eager_tower(tiny_path("llava"), engine.prepare("x", images=[img])["pixel_values"])
    fl = engine.adapter.feature_layer
    res = engine.generate("what", images=[img], plan="cls:keep=12", max_new_tokens=1)
    assert res.kept[0].tolist() == _topk(attn[fl][:, 0, 1:].mean(0), 12)
    torch.testing.assert_close(res.scores[0], attn[fl][:, 0, 1:].mean(0), atol=1e-5, rtol=1e-4)
    res = engine.generate("what", images=[img], plan="cls:keep=12,layers=0/1", max_new_tokens=1)
    assert res.kept[0].tolist() == _topk(attn[0][:, 0, 1:].mean(0) + attn[1][:, 0, 1:].mean(0), 12)
    res = engine.generate("what", images=[img], plan="cls:where=vision,layer=1,keep=12", max_new_tokens=1)
    assert res.kept[0].tolist() == _topk(attn[0][:, 0, 1:].mean(0), 12)


def test_rollout_against_explicit_matrix_product(engine_for, tiny_path):
    engine, img = engine_for("llava"), noise_image(4)
    attn = _eager_tower(tiny_path("llava"), engine.prepare("x", images=[img])["pixel_values"])
    fl = engine.adapter.feature_layer
    s = attn[0].shape[-1]
    roll = torch.eye(s)
    for a in attn[: fl + 1]:
        roll = (0.5 * a.mean(0) + 0.5 * torch.eye(s)) @ roll
    res = engine.generate("what", images=[img], plan="rollout:keep=10", max_new_tokens=1)
    assert res.kept[0].tolist() == _topk(roll[0, 1:], 10)
    torch.testing.assert_close(res.scores[0], roll[0, 1:], atol=1e-5, rtol=1e-4)


def _eager_llm_rows(path, inputs, layer, rope: bool):
    """Eager softmax rows [H, S, S] of LLM ``layer`` (prefill, batch of 1), with or without RoPE."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    out = {}

    def hook(mod, args, kwargs):
        x = kwargs["hidden_states"]
        b, s, _ = x.shape
        q = mod.q_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)
        k = mod.k_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)
        if rope:
            q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        logits = (q @ k.transpose(-1, -2))[0] * mod.scaling
        out["attn"] = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)

    h = model.model.language_model.layers[layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    h.remove()
    return out["attn"]


def test_feather_without_rope_against_eager(engine_for, tiny_path):
    engine, img = engine_for("llava"), noise_image(6)
    inputs = engine.prepare("what is the colour", images=[img])
    attn = _eager_llm_rows(tiny_path("llava"), inputs, layer=1, rope=False)
    slots = (inputs["input_ids"][0] == engine.model.config.image_token_id).nonzero().flatten()
    res = engine.generate("what is the colour", images=[img], plan="feather:layer=2,keep=9,stride=0", max_new_tokens=1)
    row = attn[:, -1, slots]
    expected = (row / row.sum(-1, keepdim=True)).mean(0)  # FEATHER's softmax is over the visual keys only
    assert res.kept[0].tolist() == _topk(expected, 9)
    torch.testing.assert_close(res.scores[0], expected, atol=1e-5, rtol=1e-4)


def _llm_input_embeds(path, inputs):
    """[S, D] the hidden states entering LLM decoder layer 0 (prefill, batch of 1)."""
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    out = {}

    def hook(mod, args, kwargs):
        out["x"] = (args[0] if args else kwargs["hidden_states"])[0]

    h = model.model.language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    h.remove()
    return out["x"]


@pytest.mark.parametrize("name", ["sparsevlm", "aim"])
def test_text_rater_methods_against_eager(engine_for, tiny_path, name):
    engine, img = engine_for("llava"), noise_image(7)
    inputs = engine.prepare("what is the colour of the circle", images=[img])
    attn = _eager_llm_rows(tiny_path("llava"), inputs, layer=1, rope=True)
    ids = inputs["input_ids"][0]
    slots = (ids == engine.model.config.image_token_id).nonzero().flatten()
    text = torch.arange(int(slots[-1]) + 1, ids.numel())
    rows = attn[:, text][:, :, slots]  # [H, T, N]
    if name == "sparsevlm":  # raters: text tokens whose input-embedding relevance to the image is above the mean
        emb = _llm_input_embeds(tiny_path("llava"), inputs)
        rel = (emb[slots] @ emb[text].T).softmax(-1).mean(0)
        expected = rows.mean(0)[rel > rel.mean()].mean(0)
        plan = "sparsevlm:layer=2,keep=9,recycle=0"
    else:  # AIM: PageRank over every row of the attention, softmax(logits / 0.1) (test_official_aim.py)
        m = torch.softmax(attn.log() / 0.1, -1)
        dist = torch.full((attn.shape[0], 1, attn.shape[-1]), 1 / attn.shape[-1])
        for _ in range(5):
            dist = dist @ m
        expected = dist[:, 0].pow(2).mean(0).sqrt()[slots]
        plan = "aim:where=llm,layer=2,keep=9"
    res = engine.generate("what is the colour of the circle", images=[img], plan=plan, max_new_tokens=1)
    assert res.kept[0].tolist() == _topk(expected, 9)
    torch.testing.assert_close(res.scores[0], expected, atol=1e-5, rtol=1e-4)


# ---- every family: runs where it applies, a clear error where it does not ---------------------

DEFAULT_PLANS = {name: f"{name}:keep=0.25" for name in REGISTRY}
DEFAULT_PLANS.update({"fastv": "fastv:layer=2,keep=0.25", "sparsevlm": "sparsevlm:keep=0.25",
                      "feather": "feather:layer=2,keep=0.25", "prumerge": "prumerge:keep=auto",
                      "quota": "quota:keep=0.25,yes=yes,no=no"})  # the tiny vocabulary has no "A"
DEFAULT_PLANS.update({"holitom_llm": "holitom_llm:layer=2,keep=0.25"})  # default layer 21 of 32: not in a tiny LLM


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_family(name, family, engine_for):
    engine = engine_for(family)
    needs_cls = get_pruner(name).requires_tower
    if needs_cls and not engine.adapter.cls_tower:
        with pytest.raises(PlanError, match=f"{name} needs a vision tower with a CLS token"):
            engine.generate("what", images=[noise_image(0)], plan=DEFAULT_PLANS[name])
        return
    if get_pruner(name).signals.of("tower", required=True) and family.startswith("qwen"):  # towers not hooked
        with pytest.raises(PlanError, match=f"{name} reads the vision tower's attention"):
            engine.generate("what", images=[noise_image(0)], plan=DEFAULT_PLANS[name])
        return
    plan = DEFAULT_PLANS[name]
    if get_pruner(name).default_where == "vision" and engine.adapter.vision_prefix is None:  # flowcut on NeXT
        with pytest.raises(PlanError, match="no vision-tower stages; give where=pre_llm"):
            engine.check_plan(plan)
        plan = plan.replace(":", ":where=pre_llm,", 1)
    frames_stage = get_pruner(name).default_where == "frames"  # shares a video's budget over its frames
    media = {"video": [noise_image(i) for i in range(4)]} if frames_stage else {"images": [noise_image(0)]}
    if get_pruner(name).reads_priority:  # the request ranks its tokens: last first
        with pytest.raises(PlanError, match="give the request a priority"):
            engine.generate("what", **media, plan=plan)
        n = engine.generate("what", **media, max_new_tokens=1).stats["visual_tokens"]
        media["priority"] = list(range(n))
    res = engine.generate("what", **media, plan=plan, max_new_tokens=2)
    n = res.stats["visual_tokens"]
    if get_pruner(name).reads_priority:
        assert res.kept[0].tolist() == list(range(n - round(0.25 * n), n))
    if frames_stage:  # QuoTA's default resize of each frame's grid keeps at most the budget
        assert 0 < res.kept[0].numel() <= max(1, round(0.25 * n))
    else:
        assert res.kept[0].numel() == (max(1, round(0.25 * n)) if name != "prumerge" else res.kept[0].numel()) > 0
    assert res.stats["kept_tokens"] == res.kept[0].numel()


def test_merge_groups_compose_through_stages(engine_for):
    engine = engine_for("llava")
    res = engine.generate("what", images=[noise_image(1)], plan="tome:keep=32;fastv:layer=2,keep=8", max_new_tokens=1)
    g0, g1 = res.groups
    assert (g0 >= 0).all() and g0.max() == 31  # ToMe: every original token is in one of the 32
    for o in range(64):
        if g1[o] >= 0:  # survived stage 2: its stage-1 token is the stage-2 kept token at g1[o]
            assert res.kept[1][g1[o]] == res.kept[0][g0[o]]
        else:
            assert res.kept[0][g0[o]] not in res.kept[1].tolist()


def test_importance_maps_on_grid(engine_for):
    from tokensieve.engine.maps import importance_maps
    engine = engine_for("llava")
    res = engine.generate("what", video=[noise_image(0), noise_image(1)], plan="cls:keep=20;fastv:layer=2,keep=5",
                          max_new_tokens=1)
    maps = importance_maps(res)
    assert [(m.stage, m.item) for m in maps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first = maps[0]
    assert first.score.shape == (8, 8) and torch.equal(first.score.flatten(), res.scores[0][:64])
    assert int(maps[0].kept.sum() + maps[1].kept.sum()) == 20 and int(maps[2].kept.sum() + maps[3].kept.sum()) == 5
    # stage 1 scores exist only where stage 0 kept a token
    assert torch.equal(~torch.isnan(maps[2].score), maps[0].kept)


def test_importance_maps_anyres_tiles(engine_for):
    from tokensieve.engine.maps import importance_maps
    res = engine_for("llava_next").generate("what", images=[noise_image(0)], plan="cls:keep=10", max_new_tokens=1)
    maps = importance_maps(res)
    assert [m.item for m in maps] == [0, 1]  # base tile, high-resolution grid
    assert maps[0].present.all() and maps[1].present[:, -1].all()  # each high-res row ends in a newline token
    assert int(sum(m.kept.sum() for m in maps)) == 10

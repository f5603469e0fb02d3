"""`aim` against a reference transcribed from the official code path (LaVi-Lab/AIM, stored as
dragonlzm/AIM): the pre-LLM merge on fixed features and the in-LLM PageRank pruning on fixed attention
logits, at LLaVA-1.5 geometry (24 x 24 = 576 patches) and the tiny models' (8 x 8 = 64); then through
the engine on the tiny LLaVA (features and attention computed eagerly here), so the recorded signal
(``all_rows``) and the merged features the LLM receives are checked too."""
import pytest
import torch
from conftest import noise_image
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, get_pruner


def official_merge_round(x, ids, members, r):
    """``bipartite_soft_matching_merge(metric=x, r, x, mode="mean")`` (llava/model/token_merge.py) on one
    frame x [t, D], with bookkeeping carried alongside through the same gathers: ids [t] (the original index
    each token stands at: B side -> its B token, unmerged A -> itself) and members [t, N] (one-hot counts)."""
    t = x.shape[0]
    r = min(r, t // 2)
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[::2], metric[1::2]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[:, None]
    unm_idx, src_idx = edge_idx[r:], edge_idx[:r]
    dst_idx = node_idx[:, None].gather(dim=-2, index=src_idx)
    out = []
    for v, reduce in ((x, "mean"), (members, "sum")):
        src, dst = v[::2], v[1::2]
        c = v.shape[1]
        unm = src.gather(dim=-2, index=unm_idx.expand(t - t // 2 - r, c))
        moved = src.gather(dim=-2, index=src_idx.expand(r, c))
        out.append(torch.cat([unm, dst.scatter_reduce(-2, dst_idx.expand(r, c), moved, reduce=reduce)]))
    return out[0], torch.cat([ids[::2][unm_idx[:, 0]], ids[1::2]]), out[1]


def official_merge(x, rs):
    """``get_2dPool`` (llava/model/llava_arch.py): rounds r = N//2, N//4 (then the commented N//8, ...)."""
    ids, members = torch.arange(x.shape[0]), torch.eye(x.shape[0], dtype=x.dtype)
    for r in rs:
        x, ids, members = official_merge_round(x, ids, members, r)
    return x, ids, members


def official_importance(logits, tau=0.1, iters=5):
    """``get_importance`` (other_packages/transformers/src/transformers/models/qwen2/modeling_qwen2.py) on
    one request's causal-masked attention logits [H, S, S] -> [S]."""
    m = torch.softmax(logits / tau, dim=-1, dtype=torch.float32)
    dist = torch.ones(logits.shape[0], 1, logits.shape[-1]) / logits.shape[-1]
    for _ in range(iters):
        dist = dist @ m  # d = 0: no smoothing term
    return dist.pow(2).mean(dim=0).pow(0.5)[0]


def official_prune(importance, vis, rate, n_vis=None):
    """``Qwen2Model.forward`` after a pruning layer: protected text tokens set to 1.0, sort descending, keep
    int(n_vis * rate + P), n_vis the visual tokens that entered the LLM (the official code masks pruned
    tokens, so its S - P still counts them; here they are absent, score -1 there): the kept visual tokens'
    positions within ``vis``."""
    imp = importance.clone()
    protected = torch.ones(imp.numel(), dtype=torch.bool)
    protected[vis] = False
    imp[protected] = 1.0
    inds = torch.sort(imp, descending=True).indices
    keep_num = int((vis.numel() if n_vis is None else n_vis) * rate + int(protected.sum()))
    kept = inds[:keep_num]
    return torch.isin(vis, kept).nonzero().flatten()


def causal(logits):
    s = logits.shape[-1]
    return logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), torch.finfo(logits.dtype).min)


def check_merge(sel, x_ref, ids, members):
    """Our kept set, groups and merged features == the official output tokens (matched by their ids)."""
    kept = sel.keep_idx.tolist()
    assert kept == sorted(ids.tolist())
    for j, o in enumerate(ids.tolist()):
        p = kept.index(o)
        torch.testing.assert_close(sel.tokens[p], x_ref[j], atol=1e-5, rtol=1e-5)
        assert (sel.groups[members[j] > 0] == p).all()
    assert int(members.sum()) == sel.groups.numel() and (sel.groups >= 0).all()


def fixed_features(n, seed, d=24):
    """Features with a shared component and uneven norms, so cosine similarities spread out."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) + 0.7 * torch.randn(1, d, generator=g)) * (0.5 + torch.rand(n, 1, generator=g))


@pytest.mark.parametrize("h, w, rs", [
    (24, 24, [288, 144]),  # the shipped setting: 25 % kept
    (24, 24, [288, 144, 72]),  # the commented 12 % line
    (24, 24, [24]),  # the commented single round "r=24"
    (8, 8, [32, 16]),
    (8, 8, [32, 16, 8, 4]),
    (13, 13, [84, 42]),  # LLaVA-Video's pooled 13 x 13 frame: odd counts, unmerged A tokens reordered
])
@pytest.mark.parametrize("seed", [0, 1])
def test_merge_against_official(h, w, rs, seed):
    x = fixed_features(h * w, seed)
    x_ref, ids, members = official_merge(x, rs)
    sel = get_pruner("aim").select(StageInput(tokens=x, keep=ids.numel(), coords=grid_coords(h, w)))
    check_merge(sel, x_ref, ids, members)


def test_merge_per_frame_against_official():
    """Four 8 x 8 frames: each merged on its own (the official batch dimension is the frame)."""
    x = fixed_features(4 * 64, 3)
    coords = torch.cat([grid_coords(8, 8, item=f) for f in range(4)])
    sel = get_pruner("aim").select(StageInput(tokens=x, keep=4 * 16, coords=coords))
    for f in range(4):
        x_ref, ids, members = official_merge(x[f * 64:(f + 1) * 64], [32, 16])
        part = (sel.keep_idx >= f * 64) & (sel.keep_idx < (f + 1) * 64)
        assert sel.keep_idx[part].tolist() == sorted((ids + f * 64).tolist())
        for j, o in enumerate(ids.tolist()):
            p = sel.keep_idx.tolist().index(o + f * 64)
            torch.testing.assert_close(sel.tokens[p], x_ref[j], atol=1e-5, rtol=1e-5)
            assert (sel.groups[f * 64:(f + 1) * 64][members[j] > 0] == p).all()


def fixed_logits(n, seed, heads=4, d=16, prefix=6, text=14):
    """Causal attention logits [H, S, S] of a [system | n image | question] sequence."""
    g = torch.Generator().manual_seed(seed)
    s = prefix + n + text
    q = torch.randn(heads, s, d, generator=g) * 0.35
    k = torch.randn(heads, s, d, generator=g) * 0.35
    return causal(q @ k.transpose(-1, -2) / d ** 0.5), torch.arange(prefix, prefix + n)


@pytest.mark.parametrize("n", [576, 64])
@pytest.mark.parametrize("rate", [0.875, 0.5, 0.125])
@pytest.mark.parametrize("seed", [0, 1])
def test_pagerank_pruning_against_official(n, rate, seed):
    logits, vis = fixed_logits(n, seed)
    imp = official_importance(logits)
    assert imp[vis].unique().numel() == n  # no ties: the official order is then well defined
    want = official_prune(imp, vis, rate)
    attn = logits.masked_fill(logits <= torch.finfo(logits.dtype).min, float("-inf")).softmax(-1)  # the engine's rows
    sel = get_pruner("aim").select(StageInput(tokens=torch.zeros(n, 4), keep=int(n * rate), coords=grid_coords(*(
        (24, 24) if n == 576 else (8, 8))), seq_attn=attn, seq_vis=vis))
    assert sel.keep_idx.tolist() == want.tolist()
    torch.testing.assert_close(sel.scores, imp[vis], atol=1e-7, rtol=1e-4)


def _apply_rope(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    return apply_rotary_pos_emb(q[None], k[None], cos, sin)


def test_engine_merge_then_two_llm_stages_against_official(engine_for, tiny_path):
    """aim:keep=16 (the official two rounds, 64 -> 32 -> 16), then stages before layers 2 and 3 keeping
    floor(16 x 0.75) and floor(16 x 0.5): the official schedule's rates over two layers.

    The reference LLM input is the engine's layout (the official merge's tokens at their representatives'
    original positions, in original order: see the docstring of pruners/aim.py); the layer-2 rows are the
    eager pass's restricted to the tokens that survive the first LLM stage (pruning only drops rows)."""
    from transformers import AutoModelForImageTextToText
    engine, img = engine_for("llava"), noise_image(5)
    prompt = "what is the colour of the big circle"
    inputs = engine.prepare(prompt, images=[img])
    model = AutoModelForImageTextToText.from_pretrained(tiny_path("llava")).eval()
    with torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]  # [S, D]: projected features placed
    ids_all = inputs["input_ids"][0]
    slots = (ids_all == engine.model.config.image_token_id).nonzero().flatten()
    x_ref, ids, members = official_merge(embeds[slots], [32, 16])
    order = ids.argsort()
    keep_slots = torch.cat([torch.arange(int(slots[0])), slots[ids[order]], torch.arange(int(slots[-1]) + 1, ids_all.numel())])
    short = embeds[keep_slots].clone()
    vis = torch.arange(int(slots[0]), int(slots[0]) + 16)
    short[vis] = x_ref[order]

    seen = {}
    hooks = [model.model.language_model.layers[layer].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs, layer=layer: seen.__setitem__(layer, (mod, kwargs["hidden_states"][0],
                                                                         kwargs["position_embeddings"])),
        with_kwargs=True) for layer in (1, 2)]
    with torch.no_grad():
        model.model.language_model(inputs_embeds=short[None], position_ids=keep_slots[None])
        for hk in hooks:
            hk.remove()

        def logits_of(layer, rows):
            mod, x, (cos, sin) = seen[layer]
            q = mod.q_proj(x[rows]).view(rows.numel(), -1, mod.head_dim).transpose(0, 1)
            k = mod.k_proj(x[rows]).view(rows.numel(), -1, mod.head_dim).transpose(0, 1)
            q, k = _apply_rope(q, k, cos[:, rows], sin[:, rows])
            k = k[0].repeat_interleave(q.shape[1] // k.shape[1], 0)
            return causal((q[0].float() @ k.float().transpose(-1, -2)) * mod.scaling)

    everything = torch.arange(short.shape[0])
    imp1 = official_importance(logits_of(1, everything))
    first = official_prune(imp1, vis, 0.75)  # positions among the 16
    alive = torch.cat([torch.arange(int(vis[0])), vis[first], torch.arange(int(vis[-1]) + 1, short.shape[0])])
    vis2 = torch.arange(int(vis[0]), int(vis[0]) + first.numel())
    imp2 = official_importance(logits_of(2, alive))
    second = first[official_prune(imp2, vis2, 0.5, n_vis=16)]

    ids_sorted = ids[order]
    hidden = []
    h = engine.adapter.llm_layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: hidden.append(kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    try:
        res = engine.generate(prompt, images=[img], max_new_tokens=1,
                              plan="aim:keep=16,positions=original;aim:where=llm,layer=2,keep=12;aim:where=llm,layer=3,keep=8")
    finally:
        h.remove()
    assert res.kept[0].tolist() == ids_sorted.tolist()
    assert res.kept[1].tolist() == ids_sorted[first].tolist()
    assert res.kept[2].tolist() == ids_sorted[second].tolist()
    torch.testing.assert_close(hidden[0][0, vis].float(), x_ref[order].float(), atol=1e-5, rtol=1e-4)
    groups = torch.full((64,), -1)
    for j in range(16):
        groups[members[j] > 0] = int((ids_sorted == ids[j]).nonzero())
    assert res.groups[0].tolist() == groups.tolist()
    torch.testing.assert_close(res.scores[1], imp1[vis], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(res.scores[2], imp2[vis2], atol=1e-6, rtol=1e-4)


def test_llm_stages_padded_batch_equals_one_at_a_time(family, engine_for):
    """The ``all_rows`` signal in a left-padded batch: each request's rows and columns are its own valid
    tokens, so every family's batch keeps (and scores) what each request alone does."""
    engine = engine_for(family)
    reqs = [{"prompt": "what is the colour of the big circle", "images": [noise_image(1, 40, 56)]},
            {"prompt": "how many", "images": [noise_image(2, 56, 40)]}]
    plan = "aim:keep=0.5;aim:where=llm,layer=2,keep=0.5;aim:where=llm,layer=3,keep=0.5"
    batch = engine.generate_batch([dict(r, plan=plan, max_new_tokens=1) for r in reqs], batch_size=2)
    for req, res in zip(reqs, batch):
        alone = engine.generate(req["prompt"], images=req["images"], plan=plan, max_new_tokens=1)
        assert [k.tolist() for k in res.kept] == [k.tolist() for k in alone.kept]
        torch.testing.assert_close(res.scores[2], alone.scores[2], atol=1e-5, rtol=1e-4)

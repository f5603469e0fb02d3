"""`sparsevlm` against a reference transcribed here from the official SparseVLM code path:
github.com/Gumpest/SparseVLMs, branch main, USE_VERSION=1_0 (the v1.5 code of the LLaVA-1.5 results),
    llava/model/language_model/modelling_sparse_llama.py  LlamaDynamicvitModel.forward
        (text raters before layer 0; the pruning layers 2/6/15; the recycling of pruned tokens)
    llava/model/language_model/score.py                   attn_postprocess_topk, sparse_token_dict
    llava/model/language_model/utils.py                   cluster_and_merge (DPC-KNN)
The reference keeps the official layout (one padded sequence: prompt, visual tokens, text; the cluster
tokens appended after the kept visual tokens) and is compared with the pruner / engine token by token:
a cluster token is identified by its centre's index."""
import pytest
import torch

from conftest import noise_image
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, get_pruner

# score.py, USE_VERSION=1_0: top-k count of the visual tokens at the official layers 2, 6, 15
SPARSE_TOKEN_DICT = {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]}


# ---- the official algorithm, transcribed ---------------------------------------------------------

def ref_raters(embeds, v_start, n_vis):
    """modelling_sparse_llama.py, forward, "Select Text Raters": embeds [1, L, D] entering layer 0 ->
    indices (relative to the first text token) of the text raters."""
    v_t = embeds[:, v_start:v_start + n_vis, :]
    t_t = embeds[:, v_start + n_vis:, :]
    m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)  # [1, T]
    return torch.where(m_v_t > m_v_t.mean())[1]


def ref_stage(attn, out, v_start, n_vis, raters, topk_count):
    """One official pruning layer. attn [1, H, L, L]: the layer's softmax attention; out [1, L, D]: the
    layer's output. score.py attn_postprocess_topk, then the forward's merge branch and utils.py
    cluster_and_merge. Returns (kept [k] visual positions in order, centres [c] visual positions,
    members [c] lists of visual positions, tokens [1, L', D] the new sequence, scores [n_vis])."""
    text_start = v_start + n_vis
    rel = attn.mean(1)[:, raters + text_start, v_start:v_start + n_vis].mean(1)  # [1, n_vis]
    _, indices = torch.topk(rel, min(topk_count, n_vis - 1), dim=1)
    mask = torch.zeros_like(rel, dtype=torch.bool)
    mask[0][indices] = True
    policy = torch.ones(out.shape[1], dtype=torch.bool)
    policy[v_start:text_start] = mask[0]
    sparse = out[:, ~policy]  # the dropped visual tokens, in order
    stage1 = torch.where(~mask[0])[0]
    n1 = int(stage1.shape[0] * 0.3) + 1
    stage2 = rel[0][stage1].topk(n1)[1]  # best first
    x = sparse[:, stage2, :]
    cluster_num = int(x.shape[1] / 10) + 1
    index_down, idx_cluster, merged = ref_cluster_and_merge(x, cluster_num)
    select = out[:, policy]
    n_kept = int(mask.sum())
    tokens = torch.cat([select[:, :v_start + n_kept], merged, select[:, v_start + n_kept:]], dim=1)
    pooled = stage1[stage2]
    members = [pooled[idx_cluster[0] == j].tolist() for j in range(cluster_num)]
    return torch.where(mask[0])[0], pooled[index_down[0]], members, tokens, rel[0]


def ref_cluster_and_merge(x, k):
    """utils.py cluster_and_merge on x [1, P, C] -> (centres [1, k], cluster of each token [1, P], merged
    [1, k, C]). The official density gets torch.rand * 1e-6 to break ties; random data has none."""
    _, n, c = x.shape
    dist = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / c ** 0.5
    nearest, _ = torch.topk(dist, k=k, dim=-1, largest=False)
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).float()
    dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
    delta, _ = (dist * mask + dist_max * (1 - mask)).min(dim=-1)
    _, index_down = torch.topk(delta * density, k=k, dim=-1)
    idx_cluster = dist[:, index_down[0], :].argmin(dim=1)
    idx_cluster[0, index_down[0]] = torch.arange(k)
    weight = torch.zeros(k).index_add_(0, idx_cluster[0], torch.ones(n)) + 1e-6
    merged = torch.zeros(k, c).index_add_(0, idx_cluster[0], x[0] / weight[idx_cluster[0], None])
    return index_down, idx_cluster, merged[None]


# ---- fixed random inputs at LLaVA-1.5 geometry (576) and the tiny models' (64) ------------------

def _sequence(n_vis, seed, prefix=5, n_text=12, dim=32, heads=4):
    """A sequence (prefix, n_vis visual, n_text text): embeddings [1, L, D], attention [1, H, L, L]."""
    g = torch.Generator().manual_seed(seed)
    L = prefix + n_vis + n_text
    embeds = torch.randn(1, L, dim, generator=g)
    logits = torch.randn(1, heads, L, L, generator=g) * 3
    attn = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return embeds, attn


def _ours(attn, out, v_start, n_vis, raters_bool, keep):
    text = slice(v_start + n_vis, out.shape[1])
    inp = StageInput(tokens=out[0, v_start:v_start + n_vis], keep=keep, coords=grid_coords(1, n_vis),
                     text_attn=attn[0][:, text, v_start:v_start + n_vis], raters=raters_bool)
    return get_pruner("sparsevlm").select(inp)


@pytest.mark.parametrize("n_vis,budget", [(576, 192), (576, 128), (576, 96), (576, 64), (64, None)])
def test_official_schedule_on_fixed_inputs(n_vis, budget):
    """Three stages (the official layers 2, 6, 15): raters, kept sets and centres exactly, cluster tokens
    within tolerance; the engine-side total per stage is the official top-k count plus its clusters."""
    counts = SPARSE_TOKEN_DICT[budget] if budget else [30, 16, 9]  # 64 tokens: a proportional schedule
    prefix = 5
    embeds, _ = _sequence(n_vis, seed=n_vis + (budget or 0), prefix=prefix)
    raters = ref_raters(embeds, prefix, n_vis)
    text = embeds[0, prefix + n_vis:]
    ours_raters = get_pruner("sparsevlm").text_raters(embeds[0, prefix:prefix + n_vis], text)
    assert ours_raters.nonzero().flatten().tolist() == raters.tolist()
    assert 0 < len(raters) < text.shape[0]
    ref_ids = list(range(n_vis))  # identity of each official visual token: original index (a cluster: its centre's)
    our_ids = list(range(n_vis))
    ref_seq, our_seq = embeds, embeds
    for stage, count in enumerate(counts):
        n = len(ref_ids)
        # the layer: fresh attention and outputs, given per token identity so both layouts see the same values
        g = torch.Generator().manual_seed(100 + stage)
        by_id = {i: torch.randn(ref_seq.shape[-1], generator=g) for i in range(n_vis)}
        _, attn_ref = _sequence(n, seed=200 + stage + n_vis, prefix=prefix)
        ref_out = ref_seq.clone()
        ref_out[0, prefix:prefix + n] += torch.stack([by_id[i] for i in ref_ids])
        kept, centres, members, ref_seq, ref_scores = ref_stage(attn_ref, ref_out, prefix, n, raters, count)
        # ours: the same tokens in our layout (ascending identity), the attention columns permuted to match
        perm = torch.tensor([ref_ids.index(i) for i in our_ids])
        cols = torch.cat([torch.arange(prefix), prefix + perm, torch.arange(prefix + n, attn_ref.shape[-1])])
        attn_ours = attn_ref[..., cols]
        our_out = our_seq.clone()
        our_out[0, prefix:prefix + n] += torch.stack([by_id[i] for i in our_ids])
        sel = _ours(attn_ours, our_out, prefix, n, ours_raters, keep=count + len(centres))
        torch.testing.assert_close(sel.scores, ref_scores[perm], rtol=1e-5, atol=1e-7)
        ref_kept_ids = sorted(ref_ids[i] for i in kept.tolist())
        ref_centre_ids = [ref_ids[i] for i in centres.tolist()]
        got_ids = [our_ids[i] for i in sel.keep_idx.tolist()]
        assert sorted(set(got_ids) - set(ref_centre_ids)) == ref_kept_ids
        assert sorted(got_ids) == sorted(ref_kept_ids + ref_centre_ids)
        for j, cid in enumerate(ref_centre_ids):  # each cluster token: same members, same features
            slot = got_ids.index(cid)
            assert sorted(our_ids[i] for i in (sel.groups == slot).nonzero().flatten().tolist()) == \
                sorted(ref_ids[i] for i in members[j])
            torch.testing.assert_close(sel.tokens[slot], ref_seq[0, prefix + len(kept) + j], rtol=1e-4, atol=1e-5)
        for i in kept.tolist():  # kept tokens unchanged
            torch.testing.assert_close(sel.tokens[got_ids.index(ref_ids[i])], ref_out[0, prefix + i])
        # carry on in each layout: ours keeps kept + centre slots in ascending identity order
        ref_ids = [ref_ids[i] for i in kept.tolist()] + ref_centre_ids
        our_ids = got_ids
        our_seq = torch.cat([our_out[:, :prefix], sel.tokens[None], our_out[:, prefix + n:]], dim=1)


def test_budget_split_matches_official_counts():
    """keep (our total) <-> the official top-k count: k + clusters(k) == keep for the official schedules."""
    from tokensieve.pruners.sparsevlm import recycle_split
    totals = {192: [309, 204, 113], 128: [312, 117, 39], 96: [249, 55, 27], 64: [82, 32, 18]}
    for budget, counts in SPARSE_TOKEN_DICT.items():
        n = 576
        for count, total in zip(counts, totals[budget]):
            dropped = n - count
            pooled = int(dropped * 0.3) + 1
            clusters = int(pooled / 10) + 1
            assert count + clusters == total
            assert recycle_split(n, total, 0.3, 0.1) == (count, pooled, clusters)
            n = total


def test_recycle_off_and_tiny_budget_are_plain_topk():
    embeds, attn = _sequence(64, seed=3)
    out = embeds + 1
    raters = get_pruner("sparsevlm").text_raters(embeds[0, 5:69], embeds[0, 69:])
    scores = attn[0].mean(0)[69:][raters][:, 5:69].mean(0)
    for keep, options in ((2, {}), (20, {"recycle": 0.0})):  # 64 tokens: recycling needs keep >= 3
        inp = StageInput(tokens=out[0, 5:69], keep=keep, coords=grid_coords(8, 8), options=options,
                         text_attn=attn[0][:, 69:, 5:69], raters=raters)
        sel = get_pruner("sparsevlm").select(inp)
        assert sel.tokens is None and sel.keep_idx.tolist() == sorted(torch.topk(scores, keep).indices.tolist())


# ---- through the engine on the tiny LLaVA ------------------------------------------------------

def _reference_pass(path, inputs, score_layer):
    """Eager reference on the unpruned model: (embeddings entering layer 0 [S, D], softmax attention of
    ``score_layer`` [H, S, S], hidden states it outputs [S, D]); computed from q_proj / k_proj here."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    layers, got = model.model.language_model.layers, {}

    def attn_hook(mod, args, kwargs):
        x = kwargs["hidden_states"]
        b, s, _ = x.shape
        q = mod.q_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)
        k = mod.k_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        logits = (q @ k.transpose(-1, -2))[0] * mod.scaling
        got["attn"] = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)

    def embeds_hook(mod, args, kwargs):
        got["embeds"] = (args[0] if args else kwargs["hidden_states"])[0]

    def out_hook(mod, args, output):
        got["out"] = (output[0] if isinstance(output, tuple) else output)[0]

    hooks = [layers[0].register_forward_pre_hook(embeds_hook, with_kwargs=True),
             layers[score_layer].self_attn.register_forward_pre_hook(attn_hook, with_kwargs=True),
             layers[score_layer].register_forward_hook(out_hook)]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return got["embeds"], got["attn"], got["out"]


def test_engine_against_official_reference(engine_for, tiny_path):
    """Default layer (3 = the official layer 2's output), keep 20 of 64: raters from the input
    embeddings, scores from layer 2's attention, DPC-KNN on layer 2's output; the pruned hidden states
    entering layer 3 hold the official cluster tokens."""
    engine, img, prompt = engine_for("llava"), noise_image(7), "what is the colour of the circle"
    inputs = engine.prepare(prompt, images=[img])
    ids = inputs["input_ids"][0]
    slots = (ids == engine.model.config.image_token_id).nonzero().flatten()
    v_start, n_vis = int(slots[0]), slots.numel()
    assert slots.tolist() == list(range(v_start, v_start + n_vis))
    embeds, attn, out = _reference_pass(tiny_path("llava"), inputs, score_layer=2)
    raters = ref_raters(embeds[None], v_start, n_vis)
    count = 18  # official top-k; its 64 - 18 = 46 dropped -> 14 pooled -> 2 clusters: 20 tokens
    kept, centres, members, seq, scores = ref_stage(attn[None], out[None], v_start, n_vis, raters, count)
    assert len(centres) == 2
    entering = {}

    def pruned_hook(mod, args, kwargs):  # registered after the engine's own hook: sees the pruned states
        entering.setdefault("h", (args[0] if args else kwargs["hidden_states"])[0].clone())

    hook = engine.model.model.language_model.layers[3].register_forward_pre_hook(pruned_hook, with_kwargs=True)
    try:
        res = engine.generate(prompt, images=[img], plan="sparsevlm:keep=20", max_new_tokens=1)
    finally:
        hook.remove()
    assert res.plan.stages[0].layer == 3
    assert res.kept[0].tolist() == sorted(kept.tolist() + centres.tolist())
    torch.testing.assert_close(res.scores[0], scores, atol=1e-5, rtol=1e-4)
    got = entering["h"][v_start:v_start + 20]  # batch of one: the prefix, then the 20 visual tokens
    for j, c in enumerate(centres.tolist()):
        slot = res.kept[0].tolist().index(c)
        assert sorted((res.groups[0] == slot).nonzero().flatten().tolist()) == sorted(members[j])
        torch.testing.assert_close(got[slot], seq[0, v_start + len(kept) + j], atol=1e-4, rtol=1e-4)
    for i in kept.tolist():
        torch.testing.assert_close(got[res.kept[0].tolist().index(i)], out[v_start + i], atol=1e-4, rtol=1e-4)


def test_engine_raters_per_request_in_a_padded_batch(engine_for):
    """Raters are chosen per request from its own embeddings: a left-padded batch == one at a time."""
    engine = engine_for("llava")
    reqs = [dict(prompt=p, images=[noise_image(i)], plan="sparsevlm:layer=1,keep=20;sparsevlm:layer=3,keep=8",
                 max_new_tokens=1) for i, p in enumerate(["what is it", "what is the colour of the big circle"])]
    batch = engine.generate_batch(reqs)
    for r, got in zip(reqs, batch):
        one = engine.generate(r["prompt"], images=r["images"], plan=r["plan"], max_new_tokens=1)
        assert [k.tolist() for k in got.kept] == [k.tolist() for k in one.kept]
        for a, b in zip(got.scores, one.scores):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

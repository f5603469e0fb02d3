"""`visionzip` against a reference transcribed from the official code path, on fixed signals at
LLaVA-1.5 geometry (24 x 24 = 576 patches) and the tiny models' (8 x 8 = 64), and through the engine
on the tiny LLaVA (eager CLS rows, keys and hidden states computed here) so the recorded signals
are checked too."""
import pytest
import torch

from conftest import noise_image
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, TowerRecord, get_pruner


def official_visionzip(cls_attn, metric, hidden, dominant, contextual):
    """The official VisionZip on one image, as ``visionzip(model, dominant, contextual)`` runs it.

    Transcribed from dvlab-research/VisionZip: ``visionzip/main.py`` (``visionzip``: the tower gets
    ``dominant_num = dominant - 1``), ``visionzip/clip_encoder.py`` (``CLIPVisionTower_VisionZip.forward``)
    and ``visionzip/utils.py`` (``CLIPAttention_forward``: metric = head mean of the raw keys).
    cls_attn [H, 1+N]: CLS row of the feature layer's softmax attention; metric [1+N, d]: that layer's
    head-averaged keys; hidden [1+N, D]: its output hidden states (CLS first).
    Returns (ids: tower index of each output token, 0 = CLS; out [len(ids), D]; joined: target -> ids merged in).
    """
    score = cls_attn[:, 1:].sum(0)  # summed over heads
    top = {int(i) + 1 for i in torch.topk(score, dominant - 1).indices}
    dominant_ids = [0] + sorted(top)  # mask + masked_select: CLS first, then index order
    rest = [i for i in range(1, hidden.shape[0]) if i not in top]
    step = max(1, len(rest) // contextual)
    target_pos = list(range(0, len(rest), step))[:contextual]
    targets = [rest[p] for p in target_pos]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    joined = {t: [] for t in targets}
    for p, o in enumerate(rest):
        if p not in target_pos:
            joined[targets[int((unit[targets] @ unit[o]).argmax())]].append(o)
    ctx = [hidden[t] + (hidden[joined[t]].mean(0) if joined[t] else 0.0) for t in targets]  # target + mean of joined
    return dominant_ids + targets, torch.stack([hidden[i] for i in dominant_ids] + ctx), joined


def fixed_signals(side, seed, heads=4, d=8, dim=16):
    """CLS attention [H, 1+N], keys [1+N, d] with uneven norms, hidden states [1+N, D]."""
    g = torch.Generator().manual_seed(seed)
    s = 1 + side * side
    attn = torch.softmax(3 * torch.randn(heads, s, generator=g), -1)
    keys = torch.randn(s, d, generator=g) * (0.1 + 3 * torch.rand(s, 1, generator=g)) + 0.5
    return attn, keys, torch.randn(s, dim, generator=g)


def ours(attn, keys, hidden, side, keep, **options):
    """The pruner on the patches, its score from its own ``tower_score`` on a one-tile record."""
    pruner = get_pruner("visionzip")
    rec = TowerRecord(prefix=1, cls={5: attn[None]}, keys={5: keys[None]})
    inp = StageInput(tokens=hidden[1:], keep=keep, coords=grid_coords(side, side), options=options,
                     tower_score=pruner.tower_score(rec, [5])[0], keys=rec.keys[5][0, 1:])
    return pruner.select(inp)


def check_against_official(sel, attn, keys, hidden, keep, c):
    """Our selection == the official run with ``dominant = keep - c + 1`` (its CLS slot to one more patch)."""
    ids, out, joined = official_visionzip(attn.double(), keys.double(), hidden.double(), keep - c + 1, c)
    assert ids[0] == 0 and len(ids) == keep + 1
    patches = [i - 1 for i in ids[1:]]
    kept = sel.keep_idx.tolist()
    assert kept == sorted(patches)
    for row, p in enumerate(patches, start=1):
        torch.testing.assert_close(sel.tokens[kept.index(p)].double(), out[row], atol=1e-5, rtol=1e-5)
    want = torch.tensor([kept.index(p) if p in kept else -1 for p in range(hidden.shape[0] - 1)])
    for t, members in joined.items():
        want[[m - 1 for m in members]] = kept.index(t - 1)
    assert (want >= 0).all()  # every patch is kept or merged into a contextual token
    assert sel.groups.tolist() == want.tolist()
    torch.testing.assert_close(sel.scores, attn[:, 1:].sum(0))  # CLS attention summed over heads


@pytest.mark.parametrize("side,keep,options,c", [
    (24, 64, {}, 10), (24, 128, {}, 20), (24, 192, {}, 30), (24, 64, {"contextual": 16}, 16),
    (8, 16, {}, 2), (8, 8, {}, 1), (8, 32, {}, 5), (8, 16, {"contextual": 6}, 6),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_official_on_fixed_signals(side, keep, options, c, seed):
    attn, keys, hidden = fixed_signals(side, seed)
    check_against_official(ours(attn, keys, hidden, side, keep, **options), attn, keys, hidden, keep, c)


def ours_full(attn, keys, hidden, side, keep, **options):
    """The pruner on [CLS, patches] (a LLaVA with vision_feature_select_strategy="full"): the CLS slot is a
    non-patch token (col = grid width) with score 0 and zero keys, as the engine maps tower signals."""
    pruner = get_pruner("visionzip")
    rec = TowerRecord(prefix=1, cls={5: attn[None]})
    score = torch.cat([torch.zeros(1), pruner.tower_score(rec, [5])[0]])
    coords = torch.cat([torch.tensor([[0, 0, side]]), grid_coords(side, side)])
    inp = StageInput(tokens=hidden, keep=keep, coords=coords, options=options, tower_score=score,
                     keys=torch.cat([torch.zeros(1, keys.shape[1]), keys[1:]]))
    return pruner.select(inp)


@pytest.mark.parametrize("side,keep,options,c", [
    (24, 64, {}, 10), (24, 128, {}, 20), (24, 192, {}, 30), (24, 64, {"contextual": 16}, 16),
    (8, 16, {}, 2), (8, 8, {}, 1), (8, 32, {}, 5),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_full_strategy_is_exactly_official(side, keep, options, c, seed):
    """With the CLS hidden state among the visual tokens, keep=k is official ``dominant=k - c, contextual=c``."""
    attn, keys, hidden = fixed_signals(side, seed)
    sel = ours_full(attn, keys, hidden, side, keep, **options)
    ids, out, joined = official_visionzip(attn.double(), keys.double(), hidden.double(), keep - c, c)
    kept = sel.keep_idx.tolist()
    assert kept == sorted(ids) and kept[0] == 0
    for row, i in enumerate(ids):
        torch.testing.assert_close(sel.tokens[kept.index(i)].double(), out[row], atol=1e-5, rtol=1e-5)
    want = [kept.index(i) if i in kept else -1 for i in range(hidden.shape[0])]
    for t, members in joined.items():
        for m in members:
            want[m] = kept.index(t)
    assert sel.groups.tolist() == want


def test_official_54_plus_10_keeps_cls_and_53_patches():
    """The README's ``dominant=54, contextual=10``: CLS + 53 patches + 10 contextual; ours at keep=64
    keeps the same 53 patches, one more dominant patch in the CLS slot, and 10 contextual tokens."""
    attn, keys, hidden = fixed_signals(24, 3)
    ids, out, _ = official_visionzip(attn, keys, hidden, 54, 10)
    assert len(ids) == out.shape[0] == 64 and ids[0] == 0
    official_dominant = {i - 1 for i in ids[1:54]}
    sel = ours(attn, keys, hidden, 24, 64)
    ours_dominant = set(torch.topk(attn[:, 1:].sum(0), 54).indices.tolist())
    assert official_dominant < ours_dominant <= set(sel.keep_idx.tolist())
    assert sel.keep_idx.numel() == 64


def test_contextual_token_is_target_plus_mean_of_joined():
    """Hand-made: 1 dominant, 1 target, 2 joiners; the contextual token is x_t + (x_a + x_b) / 2."""
    hidden = torch.tensor([[9.0, 9.0], [1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.1], [3.0, -0.1]])
    inp = StageInput(tokens=hidden, keep=2, coords=grid_coords(2, 2), tower_score=torch.tensor([1.0, 0.1, 0.2, 0.3]),
                     keys=keys, options={"contextual": 1})
    sel = get_pruner("visionzip").select(inp)
    assert sel.keep_idx.tolist() == [0, 1] and sel.groups.tolist() == [0, 1, 1, 1]
    torch.testing.assert_close(sel.tokens, torch.tensor([[9.0, 9.0], [5.0, 3.0]]))


# ---- through the engine on the tiny LLaVA ---------------------------------------------------------

def _eager_feature_layer(model, pixel_values, layer):
    """Of image 0 in CLIP layer ``layer``, computed here: CLS attention row [H, S] (softmax of q.k),
    head-averaged keys [S, d], and the layer's output hidden states [S, D]."""
    tower = model.model.vision_tower
    got = {}

    def hook(mod, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        b, s, _ = x.shape
        q = mod.q_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)[0]
        k = mod.k_proj(x).view(b, s, -1, mod.head_dim).transpose(1, 2)[0]  # [H, S, d]
        got["cls"] = torch.softmax(q[:, :1] @ k.transpose(-1, -2) * mod.scale, -1)[:, 0]
        got["keys"] = k.mean(0)

    attn = getattr(tower, "vision_model", tower).encoder.layers[layer].self_attn
    h = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True)
    finally:
        h.remove()
    return got["cls"], got["keys"], out.hidden_states[layer + 1][0]


def _visual_embeds(engine, img, plan, inputs, k):
    """Run ``plan``; the LLM's input embeddings [k, D] at the image's kept slots (caught before decoder layer 0)."""
    seen = []
    h = engine.adapter.llm_layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    try:
        res = engine.generate("what", images=[img], plan=plan, max_new_tokens=1)
    finally:
        h.remove()
    first = int((inputs["input_ids"][0] == engine.model.config.image_token_id).nonzero()[0])
    return res, seen[0][0, first:first + k].float()


def _projected(engine, out, ids):
    """projector(official output rows) in our slot order (index order of their tower ids) -> [k, D]."""
    order = sorted(range(len(ids)), key=lambda r: ids[r])
    with torch.no_grad():
        return engine.model.model.multi_modal_projector(out[order][None].to(engine.model.dtype))[0].float()


def test_engine_matches_official_on_tiny_llava(engine_for):
    """"default" strategy: the official run with dominant = keep - c + 1, its CLS row removed; the LLM's
    visual embeddings are the projector of the official merged feature-layer states (merged before it)."""
    engine, img = engine_for("llava"), noise_image(3)
    inputs = engine.prepare("what", images=[img])
    cls_row, keys, hidden = _eager_feature_layer(engine.model, inputs["pixel_values"], engine.adapter.feature_layer)
    ids, out, joined = official_visionzip(cls_row, keys, hidden, 16 - 2 + 1, 2)
    res, embeds = _visual_embeds(engine, img, "visionzip:keep=16", inputs, 16)
    patches = [i - 1 for i in ids[1:]]
    kept = res.kept[0].tolist()
    assert kept == sorted(patches)
    torch.testing.assert_close(res.scores[0], cls_row[:, 1:].sum(0), atol=1e-5, rtol=1e-4)
    want = [kept.index(p) if p in kept else -1 for p in range(64)]
    for t, members in joined.items():
        for m in members:
            want[m - 1] = kept.index(t - 1)
    assert res.groups[0].tolist() == want
    torch.testing.assert_close(embeds, _projected(engine, out[1:], ids[1:]), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def full_llava(tmp_path_factory):
    """The tiny LLaVA with vision_feature_select_strategy="full": its projector receives the CLS hidden state."""
    import json

    import tokensieve
    from tokensieve.testing import make_tiny
    path = make_tiny("llava", tmp_path_factory.mktemp("llava_full_vz"))
    for name in ("config.json", "processor_config.json"):
        with open(f"{path}/{name}") as f:
            data = json.load(f)
        data["vision_feature_select_strategy"] = "full"
        with open(f"{path}/{name}", "w") as f:
            json.dump(data, f)
    engine = tokensieve.load(path)
    yield engine
    engine.close()


@pytest.mark.parametrize("keep", [16, 24])
def test_engine_full_strategy_is_exactly_official(full_llava, keep):
    """Visual token i is tower token i (0 = CLS): kept set, groups and the LLM's visual embeddings are
    the official ones (projector of the official output), in index order."""
    engine, img = full_llava, noise_image(4)
    inputs = engine.prepare("what", images=[img])
    cls_row, keys, hidden = _eager_feature_layer(engine.model, inputs["pixel_values"], engine.adapter.feature_layer)
    c = round(keep * 10 / 64)
    ids, out, joined = official_visionzip(cls_row, keys, hidden, keep - c, c)
    res, embeds = _visual_embeds(engine, img, f"visionzip:keep={keep}", inputs, keep)
    kept = res.kept[0].tolist()
    assert kept == sorted(ids) and kept[0] == 0
    want = [kept.index(i) if i in kept else -1 for i in range(65)]
    for t, members in joined.items():
        for m in members:
            want[m] = kept.index(t)
    assert res.groups[0].tolist() == want
    torch.testing.assert_close(embeds, _projected(engine, out, ids), atol=1e-4, rtol=1e-4)

"""FlowCut against a reference transcribed here from the official code path.

Reference: TungChintao/FlowCut, ``flowcut/modeling_clip_flowcut.py`` (CLIPAttention_forward: the CLS
attention row, the softmax of the CLS value against the values, the head-mean value;
CLIPEncoderLayer_forward: score, running score, pruning after the layer; CLIPEncoder_forward:
remain_prune_layer = select_layer - idx - 1, select_layer = len(layers) - 2), ``flowcut/utils_flowcut.py``
(compute_score, adaptive_prune_ratio) and ``flowcut/main.py`` (flowcut: target = target_num + 1 with the
CLS token). The reference drops tokens between layers as the official encoder does.

(a) fixed random per-layer q / k / v at LLaVA-1.5 geometry (577 tokens, 24 layers, feature layer 22) and
    at the tiny geometry (65 tokens), through the engine's recording (``record_vision``) and vision-stage
    pre-hook (``before_vision_layer``): kept sets exactly, batch rule included; the ``where=pre_llm``
    replay on the same (pruning-independent) signals too.
(b) through the engine on tiny LLaVA models (3 and 8 CLIP layers), against a hand-run tower that drops
    the tokens between layers: kept sets exactly, the LLM features (projector output) within tolerance,
    the running scores of the survivors, and the tower FLOPs the stats report.
"""
import pytest
import torch

from conftest import noise_image
from tokensieve.engine import metering
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.engine.plan import Plan
from tokensieve.engine.state import RequestState, StageRun
from tokensieve.pruners import StageInput, TowerRecord, get_pruner


# ---- the reference (official code path, transcribed) ---------------------------------------------

def ref_score(cls_attn, semantic, value):
    """utils_flowcut.compute_score: [B, N], [B, N], [B, N, d] -> [B, N]."""
    relation = cls_attn / cls_attn.sum(-1, keepdim=True)
    sem = semantic / semantic.sum(-1, keepdim=True)
    return (relation + sem) * value.abs().sum(-1)


def ref_prune_num(cls_attn, rpl, target_num):
    """utils_flowcut.adaptive_prune_ratio: the entropy-adaptive count, the max over the batch."""
    n = cls_attn.shape[-1]
    prob = cls_attn / cls_attn.sum(-1, keepdim=True)
    ratio = -(prob * prob.log()).sum(-1) / torch.log(torch.tensor(float(n)))
    r = (n - target_num) / rpl ** 0.5 * (1 - ratio ** 2)
    return int(r.max().round())


def official_signals(q, k, v, scale):
    """CLIPAttention_forward's FlowCut outputs over the patches of the S tokens: q, k, v [B, H, S, d] ->
    CLS attention [B, N] (head mean), CLS-value softmax [B, N] (over all S, head mean), head-mean value [B, N, d]."""
    attn = torch.softmax(q @ k.transpose(-1, -2) * scale, -1)  # [B, H, S, S]
    semantic = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), -1)[:, :, 0].mean(1)  # [B, S]
    return attn[:, :, 0, 1:].mean(1), semantic[:, 1:], v.mean(1)[:, 1:]


def reference_flowcut(run_layer, h, n_layers, target_num):
    """The official CLIP encoder with FlowCut. h [B, 1 + P, D] enters layer 0; run_layer(idx, h) ->
    (output [B, S, D], the layer's ``official_signals`` of its S - 1 patches).
    Returns (hidden states entering each layer and the last output, alive patches [B, k] per layer
    after it, the running score of the final survivors [B, k])."""
    select_layer = n_layers - 2  # apply_flowcut_config
    target = target_num + 1  # flowcut(): one slot for the CLS token
    alive = torch.arange(h.shape[1] - 1).expand(h.shape[0], -1)
    states, alive_after, cum = [h], [], None
    for idx in range(n_layers):
        rpl = select_layer - idx - 1
        h, cls_attention, semantic, value = run_layer(idx, h)
        if h.shape[1] > target:
            score = ref_score(cls_attention, semantic, value)
            cum = score if cum is None else 0.5 * cum + 0.5 * score
            if rpl % 2 == 0:
                prune = ref_prune_num(cls_attention, rpl, target - 1) if rpl else h.shape[1]
                n_keep = max(h.shape[1] - prune, target)
                idx_k = torch.topk(cum, n_keep - 1, dim=1).indices.sort(1).values
                h = torch.cat([h[:, :1], h[:, 1:].gather(1, idx_k[..., None].expand(-1, -1, h.shape[-1]))], 1)
                cum, alive = cum.gather(1, idx_k), alive.gather(1, idx_k)
        states.append(h)
        alive_after.append(alive)
    return states, alive_after, cum


def fixed_layers(q, k, v, full=False):
    """run_layer over fixed per-layer q, k, v [L, B, H, S, d] of the original tokens: h carries each
    token's original index (CLS 0, patch j at j + 1) and passes unchanged. The signals are those of the
    current tokens, or (``full``) those of all tokens restricted to the current patches."""
    scale = q.shape[-1] ** -0.5

    def run_layer(idx, h):
        ids = h[..., 0].long()  # [B, S]
        if full:
            sig = official_signals(q[idx], k[idx], v[idx], scale)
            return (h, *(torch.stack([x[b, ids[b, 1:] - 1] for b in range(ids.shape[0])]) for x in sig))
        pick = lambda x: torch.stack([x[idx, b][:, ids[b]] for b in range(ids.shape[0])])  # noqa: E731
        return (h, *official_signals(pick(q), pick(k), pick(v), scale))
    return run_layer


def random_qkv(n_layers, batch, tokens, seed, heads=4, dim=8):
    """Per layer its own sharpness, so the entropy-adaptive steps prune different amounts."""
    g = torch.Generator().manual_seed(seed)
    sharp = torch.rand(n_layers, generator=g) * 6 + 1
    q = torch.randn(n_layers, batch, heads, tokens, dim, generator=g) * sharp.view(-1, 1, 1, 1, 1)
    return q, torch.randn(q.shape, generator=g), torch.randn(q.shape, generator=g)


# ---- the engine's path on fixed signals -----------------------------------------------------------

def engine_flowcut(q, k, v, keep, side):
    """The engine's vision-stage path for one flowcut stage, one image per request (B requests):
    ``record_vision`` in every layer's attention, ``before_vision_layer`` before every layer."""
    n_layers, batch, patches = q.shape[0], q.shape[1], side * side
    pruner, stage = get_pruner("flowcut"), Plan.parse(f"flowcut:keep={keep}").stages[0]
    last = n_layers - 2  # the feature layer of vision_feature_layer=-2
    run = StageRun(index=0, stage=stage, pruner=pruner, keep=[keep] * batch,
                   tower_layers=pruner.tower_layers(last - 1, {}), steps=pruner.vision_steps(last, {}))
    state = RequestState(batch_size=batch, owner=[torch.arange(patches) for _ in range(batch)])
    state.vision_stages = {s: run for s in run.steps}
    state.tower_wants = {j: set(pruner.vision_needs) for j in run.tower_layers}
    state.tower = TowerRecord(prefix=1)
    state.image_owner, state.image_offset = list(range(batch)), [0] * batch
    state.image_alive = [torch.arange(patches) for _ in range(batch)]
    state.image_coords = [grid_coords(side, side) for _ in range(batch)]
    h = torch.arange(patches + 1.).expand(batch, -1)[..., None]
    lengths = []
    for layer in range(n_layers):
        h = state.before_vision_layer(layer, h, 1)
        lengths.append(h.shape[1])
        ids = h[..., 0].long()
        pick = lambda x: torch.stack([x[layer, b][:, ids[b]] for b in range(batch)])  # noqa: E731
        state.record_vision(layer, pick(q), pick(k), pick(v), q.shape[-1] ** -0.5)
    return state.kept[0], lengths, state


@pytest.mark.parametrize("n_layers,side,keep,batch", [(24, 24, 64, 1), (24, 24, 128, 1), (24, 24, 192, 1),
                                                      (24, 24, 64, 2), (3, 8, 10, 1), (8, 8, 10, 1), (7, 8, 16, 2)])
def test_fixed_signals_progressive(n_layers, side, keep, batch):
    q, k, v = random_qkv(n_layers, batch, side * side + 1, seed=n_layers * 100 + keep + batch)
    h0 = torch.arange(side * side + 1.).expand(batch, -1)[..., None]
    states, alive_after, _ = reference_flowcut(fixed_layers(q, k, v), h0, n_layers, keep)
    kept, lengths, _ = engine_flowcut(q, k, v, keep, side)
    for b in range(batch):
        assert kept[b].tolist() == alive_after[-1][b].tolist()
    assert lengths == [s.shape[1] for s in states[:-1]]  # the tower shrinks layer by layer as the official one
    if n_layers == 24:  # the entropy-adaptive steps do prune before the last one, each by its own amount
        sizes = sorted({s.shape[1] for s in states})
        assert len(sizes) > 4 and sizes[0] == keep + 1


@pytest.mark.parametrize("n_layers,side,keep", [(24, 24, 64), (24, 24, 192), (8, 8, 10)])
def test_fixed_signals_replay_before_llm(n_layers, side, keep):
    """where=pre_llm: the official steps replayed on the unpruned tower's signals (head means of softmaxes
    over all tokens, restricted to the alive patches)."""
    q, k, v = random_qkv(n_layers, 1, side * side + 1, seed=7 + keep)
    _, alive_after, _ = reference_flowcut(fixed_layers(q, k, v, full=True),
                                          torch.arange(side * side + 1.)[None, :, None], n_layers, keep)
    pruner, feature_layer = get_pruner("flowcut"), n_layers - 2
    state = RequestState(batch_size=1)
    layers = pruner.tower_layers(feature_layer, {})
    state.tower_wants = {j: set(pruner.vision_needs) for j in layers}
    state.tower = TowerRecord(prefix=1)
    for layer in layers:
        state.record_vision(layer, q[layer], k[layer], v[layer], q.shape[-1] ** -0.5)
    score = pruner.tower_score(state.tower, layers)[0]
    sel = pruner.select(StageInput(tokens=torch.zeros(side * side, 4), keep=keep, coords=grid_coords(side, side),
                                   tower_score=score))
    assert sel.keep_idx.tolist() == alive_after[-1][0].tolist()


# ---- through the engine on tiny LLaVA models ----------------------------------------------------

@pytest.fixture(scope="module")
def deep_llava(tiny_path, tmp_path_factory):
    """The tiny LLaVA with 8 CLIP layers (feature layer 6: steps before layers 2, 4, 6) and sharper
    attention (q scaled), so the entropy-adaptive steps prune."""
    import tokensieve
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig
    src = tiny_path("llava")
    base = AutoModelForImageTextToText.from_pretrained(src)
    cfg = AutoConfig.from_pretrained(src)
    cfg.vision_config.num_hidden_layers = 8
    torch.manual_seed(11)
    model = type(base)(cfg)
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for layer in _tower(model).encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    path = str(tmp_path_factory.mktemp("llava_deep"))
    model.eval().save_pretrained(path)
    AutoProcessor.from_pretrained(src).save_pretrained(path)
    GenerationConfig.from_pretrained(src).save_pretrained(path)
    engine = tokensieve.load(path)
    yield engine, path
    engine.close()


def _tower(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def eager_layers(tower, qkv=None):
    """run_layer for a CLIP tower: q, k, v from the layer's own projections of its normed input (kept in
    ``qkv`` when given)."""
    def run_layer(idx, h):
        block = tower.encoder.layers[idx]
        att = block.self_attn
        x = block.layer_norm1(h)
        split = lambda t: t.view(*h.shape[:2], -1, att.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(att.q_proj(x)), split(att.k_proj(x)), split(att.v_proj(x))
        if qkv is not None:
            for store, t in zip(qkv, (q, k, v)):
                store.append(t)
        out = block(h, None)
        return (out[0] if isinstance(out, tuple) else out), *official_signals(q, k, v, att.scale)
    return run_layer


def _engine_features(engine, images, plan):
    """Run the engine; also capture what its projector produced (the LLM's visual features)."""
    got = []
    hook = engine.model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: got.append(out))
    try:
        res = engine.generate("what is it", images=images, plan=plan, max_new_tokens=1)
    finally:
        hook.remove()
    return res, got[0]


@pytest.mark.parametrize("which,keep,n_images", [("tiny", 10, 1), ("deep", 10, 1), ("deep", 24, 1), ("deep", 12, 2)])
def test_engine_matches_official_tower(engine_for, tiny_path, deep_llava, which, keep, n_images):
    engine, path = (engine_for("llava"), tiny_path("llava")) if which == "tiny" else deep_llava
    from transformers import AutoModelForImageTextToText
    ref = AutoModelForImageTextToText.from_pretrained(path).eval()
    tower = _tower(ref)
    images = [noise_image(20 + i) for i in range(n_images)]
    pixel_values = engine.prepare("x", images=images)["pixel_values"]
    n_layers = len(tower.encoder.layers)
    with torch.no_grad():
        h0 = tower.pre_layrnorm(tower.embeddings(pixel_values))
        states, alive_after, cum = reference_flowcut(eager_layers(tower), h0, n_layers, keep)
        feats = ref.model.multi_modal_projector(states[ref.config.vision_feature_layer][:, 1:])
    res, got = _engine_features(engine, images, f"flowcut:keep={keep}")
    expected = torch.cat([alive_after[-1][i] + i * 64 for i in range(n_images)])
    assert res.kept[0].tolist() == expected.tolist()
    torch.testing.assert_close(got, feats, atol=1e-5, rtol=1e-4)  # the LLM sees the tower run with the drops
    torch.testing.assert_close(res.scores[0][expected], cum.flatten(), atol=1e-6, rtol=1e-4)
    seq = [[s.shape[1]] * n_images for s in states[:-1]]
    assert res.stats["vision_flops"] == metering.vision_flops(seq, engine.model.config.vision_config)
    if which == "deep":  # the steps before the last one pruned by themselves, the tower ran shorter
        assert len({s.shape[1] for s in states}) > 2
        full = engine.generate("what is it", images=images, max_new_tokens=1).stats["vision_flops"]
        assert res.stats["vision_flops"] < full


def test_engine_replay_before_llm(deep_llava):
    """where=pre_llm: the tower runs in full; the steps are replayed on its layers 0..F-1."""
    engine, path = deep_llava
    from transformers import AutoModelForImageTextToText
    tower = _tower(AutoModelForImageTextToText.from_pretrained(path).eval())
    img = noise_image(31)
    pixel_values = engine.prepare("x", images=[img])["pixel_values"]
    qkv = [[], [], []]
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(pixel_values))
        for idx in range(len(tower.encoder.layers)):  # the tower in full: every layer's q, k, v
            h = eager_layers(tower, qkv)(idx, h)[0]
    q, k, v = (torch.stack(x) for x in qkv)
    _, alive_after, _ = reference_flowcut(fixed_layers(q, k, v, full=True), torch.arange(65.)[None, :, None],
                                          q.shape[0], 10)
    res = engine.generate("what", images=[img], plan="flowcut:where=pre_llm,keep=10", max_new_tokens=1)
    assert res.kept[0].tolist() == alive_after[-1][0].tolist()
    full = engine.generate("what", images=[img], max_new_tokens=1).stats["vision_flops"]
    assert res.stats["vision_flops"] == full  # nothing saved inside the tower


def test_plan_checks(engine_for):
    from tokensieve import PlanError
    llava = engine_for("llava")
    assert str(Plan.parse("flowcut:keep=64")) == "flowcut:where=vision,keep=64"
    with pytest.raises(PlanError, match="only vision-tower stage"):
        llava.check_plan("uniform:where=vision,layer=1,keep=32;flowcut:where=vision,layer=2,keep=16")
    with pytest.raises(PlanError, match="no vision-tower stages; give where=pre_llm"):
        engine_for("llava_next").check_plan("flowcut:keep=16")
    engine_for("llava_next").check_plan("flowcut:where=pre_llm,keep=16")

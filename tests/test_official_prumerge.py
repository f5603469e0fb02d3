"""`prumerge` (PruMerge+) against a reference transcribed from the official code path, on fixed q / k /
features at LLaVA-1.5 geometry (24 x 24 = 576 patches) and the tiny models' (8 x 8 = 64), and through the
engine on the tiny LLaVA (q / k of the layer after the feature layer and the feature-layer hidden states
computed here with forward hooks, as the official code takes them) so the recorded signals are checked too."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import noise_image
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, TowerRecord, get_pruner

# ---- the reference ------------------------------------------------------------------------------
# Transcribed from 42Shawn/LLaVA-PruMerge, llava/model/multimodal_encoder/clip_encoder.py:
# ``outlier_dectection`` and ``CLIPVisionTower.token_prune_merge_advanced_plus`` (``if_adaptive=True`` is the
# inference path ``forward`` takes; ``if_adaptive=False`` the fixed-ratio one). The official end ``575`` of
# the spatial ``arange`` is N - 1 at N = 576; written ``n - 1`` here for the 8 x 8 grid.


def official_cls_attn(q, k):
    """q, k [1+N, C] (q_proj / k_proj outputs of layers[23], one C-wide head) -> CLS attention of the patches [N]."""
    attn = torch.softmax(q @ k.T * q.shape[-1] ** -0.5, dim=-1)
    return attn[0, 1:]


def official_outlier_ratio(cls_attn):
    a = cls_attn.to(torch.float32).numpy().flatten()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    return len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / len(a)


def official_adaptive_idx(cls_attn):
    """The kept patch ids in the official order: outliers by descending attention, then the spatial samples."""
    n = cls_attn.shape[0]
    ratio = official_outlier_ratio(cls_attn)
    idx = torch.topk(cls_attn, int(n * ratio)).indices.tolist()
    step_length = int(1 / ratio)
    seq = torch.arange(0, n - 1, int(step_length / 3)).tolist()
    return idx + [x for x in seq if x not in idx], idx


def official_fixed_idx(cls_attn, reduction_ratio):
    """The fixed-ratio path: (top int(N r) ids, spatial ids arange(int(step / 2), N - 1, step)), duplicates kept."""
    n = cls_attn.shape[0]
    idx = torch.topk(cls_attn, int(n * reduction_ratio)).indices.tolist()
    step_length = int(1 / reduction_ratio)
    return idx, torch.arange(int(step_length / 2), n - 1, int(step_length)).tolist()


def official_merge(x, keys, cls_attn, idx):
    """Per kept token (official loop): x_i + sum of the 32 most key-similar other tokens' x weighted by their
    raw CLS attention; then the extra token, sum over the non-kept tokens. Returns ([len(idx), D], [D])."""
    n = x.shape[0]
    compl = sorted(set(range(n)) - set(idx))
    unit = F.normalize(keys, p=2, dim=-1)
    out = []
    for i, t in enumerate(idx):
        rest = idx[:i] + idx[i + 1:] + compl
        cos = unit[rest] @ unit[t]
        near = torch.topk(cos, 32).indices
        out.append(x[t] + (x[rest][near] * cls_attn[rest][near, None]).sum(0))
    return torch.stack(out), (x[compl] * cls_attn[compl, None]).sum(0)


def engine_view(idx, out, extra, n):
    """What our engine holds for an official result: the kept ids plus the summary slot (the last non-kept id),
    in index order, their tokens, and the groups (every non-kept id -> the summary token)."""
    slot = max(set(range(n)) - set(idx))
    kept = sorted(idx + [slot])
    rows = {t: out[i] for i, t in enumerate(idx)} | {slot: extra}
    groups = [kept.index(slot) if i not in idx else kept.index(i) for i in range(n)]
    return kept, torch.stack([rows[t] for t in kept]), groups


# ---- fixed signals -----------------------------------------------------------------------------

def fixed_signals(side, seed, heads=4, d=16, dim=24):
    """q, k [1+N, C] (C = heads * d) with a few strongly attended patches and uneven key norms, features [N, D]."""
    g = torch.Generator().manual_seed(seed)
    n, c = side * side, heads * d
    q = torch.randn(1 + n, c, generator=g)
    k = torch.randn(1 + n, c, generator=g) * (0.5 + torch.rand(1 + n, 1, generator=g))
    hot = torch.randperm(n, generator=g)[: max(2, n // 24)] + 1
    k[hot] += q[0] * (2.0 + torch.rand(hot.numel(), 1, generator=g)) / c ** 0.5
    return q, k, torch.randn(n, dim, generator=g)


def split_heads(t, heads):
    """[S, C] -> [1, H, S, d]: how the tower's attention sees a q_proj / k_proj output."""
    s, c = t.shape
    return t.view(1, s, heads, c // heads).transpose(1, 2)


def ours(q, k, x, side, keep, heads=4, **options):
    """The pruner on the patches, its signals from its own ``tower_score`` on a one-tile record (layer 23)."""
    pruner = get_pruner("prumerge")
    rec = TowerRecord(prefix=1, qk={23: (split_heads(q, heads), split_heads(k, heads))})
    inp = StageInput(tokens=x, keep=keep, coords=grid_coords(side, side), options=options,
                     tower_score=pruner.tower_score(rec, [23])[0])
    return pruner.select(inp)


def check(sel, kept, rows, groups, cls_attn):
    assert sel.keep_idx.tolist() == kept
    torch.testing.assert_close(sel.tokens, rows.float(), atol=1e-5, rtol=1e-4)
    assert sel.groups.tolist() == groups
    torch.testing.assert_close(sel.scores, cls_attn.float(), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("side", [24, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_matches_official(side, seed):
    q, k, x = fixed_signals(side, seed)
    a = official_cls_attn(q.double(), k.double())
    idx, outliers = official_adaptive_idx(a.float())
    assert 0 < len(outliers) < len(idx) < side * side - 1
    out, extra = official_merge(x.double(), k[1:].double(), a, idx)
    check(ours(q, k, x, side, None), *engine_view(idx, out, extra, side * side), a)


@pytest.mark.parametrize("side,keep", [(24, 192), (24, 128), (24, 64), (24, 144), (8, 16), (8, 9)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fixed_budget_is_official_fixed_ratio(side, keep, seed):
    """keep = K: the official fixed-ratio path at r = (K - 1) / 2N (one place is the summary token), the places
    its duplicates leave filled with the next-highest CLS attention."""
    q, k, x = fixed_signals(side, seed)
    n, m = side * side, keep - 1
    a = official_cls_attn(q.double(), k.double())
    top, spatial = official_fixed_idx(a.float(), m / (2 * n))
    chosen = list(dict.fromkeys(top + spatial))
    assert len(chosen) <= m
    chosen += [i for i in torch.argsort(a, descending=True).tolist() if i not in chosen][: m - len(chosen)]
    out, extra = official_merge(x.double(), k[1:].double(), a, chosen)
    sel = ours(q, k, x, side, keep)
    assert sel.keep_idx.numel() == keep
    check(sel, *engine_view(chosen, out, extra, n), a)


@pytest.mark.parametrize("keep", [None, 192, 128, 64])
def test_spatial_samples_reach_the_bottom_rows(keep):
    """All the high-attention patches lie in rows 0-3 (the top ones kept for the score are all there), yet
    every band of 4 rows below keeps a token, the last row too: the stride covers the whole grid."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(576, generator=g) * 0.01
    a[:96] = 0.1 + 0.1 * torch.rand(96, generator=g)
    a[torch.randperm(96, generator=g)[:20]] += 0.5
    inp = StageInput(tokens=torch.randn(576, 8, generator=g), keep=keep, coords=grid_coords(24, 24),
                     tower_score=torch.cat([a[:, None], torch.randn(576, 6, generator=g)], 1))
    n_top = len(official_adaptive_idx(a)[1]) if keep is None else (keep - 1) // 2
    assert set(torch.topk(a, n_top).indices.tolist()) <= set(range(96))
    kept = get_pruner("prumerge").select(inp).keep_idx.tolist()
    assert kept[-1] == 575  # the summary slot
    rows = {i // 24 for i in kept[:-1]}
    assert all(rows & set(range(r, r + 4)) for r in range(4, 24, 4)) and 23 in rows


def test_auto_stride_stops_before_the_last_token():
    """One outlier at 8 x 8: stride int(64 / 3) = 21 over arange(0, N - 1) -> 0, 21, 42 (not 63, which the
    official ``575`` end leaves out); the summary token takes slot 63."""
    g = torch.Generator().manual_seed(0)
    a = 0.01 + 0.001 * torch.rand(64, generator=g)
    a[10] = 0.5
    idx, outliers = official_adaptive_idx(a)
    assert outliers == [10] and idx == [10, 0, 21, 42]
    inp = StageInput(tokens=torch.randn(64, 8, generator=g), keep=None, coords=grid_coords(8, 8),
                     tower_score=torch.cat([a[:, None], torch.randn(64, 6, generator=g)], 1))
    assert get_pruner("prumerge").select(inp).keep_idx.tolist() == [0, 10, 21, 42, 63]


def test_one_full_width_head_not_head_mean():
    """The score is the softmax of the concatenated q_cls . K / sqrt(C), not the mean of per-head softmaxes."""
    q, k, x = fixed_signals(8, 0)
    sel = ours(q, k, x, 8, 16)
    torch.testing.assert_close(sel.scores, official_cls_attn(q, k), atol=1e-7, rtol=1e-5)
    qh, kh = split_heads(q, 4)[0], split_heads(k, 4)[0]
    head_mean = torch.softmax(qh[:, :1] @ kh.transpose(-1, -2) / 4, -1)[:, 0, 1:].mean(0)
    assert not torch.allclose(sel.scores, head_mean, atol=1e-4)


def test_options_plain_prumerge_and_no_summary():
    q, k, x = fixed_signals(24, 0)
    a = official_cls_attn(q.double(), k.double())
    _, outliers = official_adaptive_idx(a.float())
    sel = ours(q, k, x, 24, None, spatial=0, summary=False)  # token_prune_merge_advanced, extra token dropped
    assert sel.keep_idx.tolist() == sorted(outliers)
    out, _ = official_merge(x.double(), k[1:].double(), a, sorted(outliers))
    torch.testing.assert_close(sel.tokens, out.float(), atol=1e-5, rtol=1e-4)
    kept = sel.keep_idx.tolist()
    assert sel.groups.tolist() == [kept.index(i) if i in kept else -1 for i in range(576)]  # pruned: dropped
    fixed = ours(q, k, x, 24, 64, spatial=0)
    assert fixed.keep_idx.tolist() == sorted(torch.topk(a, 63).indices.tolist() + [max(
        set(range(576)) - set(torch.topk(a, 63).indices.tolist()))])


def test_merge_is_unnormalised_weighted_sum_by_hand():
    """4 tokens, 1 kept: x_0 + sum_j a_j x_j over its (3 < 32) neighbours, and the summary token a . x."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]])
    a = torch.tensor([0.5, 0.1, 0.2, 0.15])
    keys = torch.randn(4, 3)
    inp = StageInput(tokens=x, keep=2, coords=grid_coords(2, 2), tower_score=torch.cat([a[:, None], keys], 1),
                     options={"spatial": 0})
    sel = get_pruner("prumerge").select(inp)
    assert sel.keep_idx.tolist() == [0, 3] and sel.groups.tolist() == [0, 1, 1, 1]
    torch.testing.assert_close(sel.tokens[0], x[0] + 0.1 * x[1] + 0.2 * x[2] + 0.15 * x[3])
    torch.testing.assert_close(sel.tokens[1], 0.1 * x[1] + 0.2 * x[2] + 0.15 * x[3])


# ---- through the engine on the tiny LLaVA ---------------------------------------------------------

def _eager_official_signals(model, pixel_values, layer):
    """Of image 0: q_proj / k_proj outputs [1+N, C] of CLIP layer ``layer + 1`` (forward hooks, as the official
    code takes them) and the patches of the feature layer's output hidden states [N, D]."""
    tower = model.model.vision_tower
    attn = getattr(tower, "vision_model", tower).encoder.layers[layer + 1].self_attn
    got = {}
    hs = [attn.q_proj.register_forward_hook(lambda m, i, o: got.setdefault("q", o[0])),
          attn.k_proj.register_forward_hook(lambda m, i, o: got.setdefault("k", o[0]))]
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    return got["q"], got["k"], out.hidden_states[layer + 1][0, 1:]


def _engine_run(engine, img, plan):
    """(result, the projector's inputs during the call)."""
    proj_in = []
    h = engine.model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: proj_in.append(args[0]))
    try:
        return engine.generate("what", images=[img], plan=plan, max_new_tokens=1), proj_in
    finally:
        h.remove()


@pytest.mark.parametrize("plan", ["prumerge:keep=auto", "prumerge:keep=16", "prumerge:keep=auto,spatial=1"])
@pytest.mark.parametrize("seed", [4, 6])  # 2 and 3 outliers on the tiny tower (seed 3 has none: see below)
def test_engine_matches_official_on_tiny_llava(engine_for, plan, seed):
    engine, img = engine_for("llava"), noise_image(seed)
    fl = engine.adapter.feature_layer
    assert len(engine.adapter.vision_layers) > fl + 1  # layer fl + 1 exists (and runs) after the feature layer
    q, k, hidden = _eager_official_signals(engine.model, engine.prepare("what", images=[img])["pixel_values"], fl)
    a = official_cls_attn(q.double(), k.double())
    if "auto" in plan:
        idx, _ = official_adaptive_idx(a.float())
        if "spatial=1" in plan:  # our option: stride int(1 / ratio) / 1 in place of / 3
            ratio = official_outlier_ratio(a.float())
            idx = idx[:int(64 * ratio)]
            idx += [s for s in range(0, 63, int(1 / ratio)) if s not in idx]
    else:
        top, spatial = official_fixed_idx(a.float(), 15 / 128)
        idx = list(dict.fromkeys(top + spatial))
        idx += [i for i in torch.argsort(a, descending=True).tolist() if i not in idx][: 15 - len(idx)]
    out, extra = official_merge(hidden.double(), k[1:].double(), a, idx)
    kept, rows, groups = engine_view(idx, out, extra, 64)
    res, proj_in = _engine_run(engine, img, plan)
    assert res.kept[0].tolist() == kept
    assert res.groups[0].tolist() == groups
    torch.testing.assert_close(res.scores[0].double(), a, atol=1e-6, rtol=1e-4)
    # merged on the feature-layer hidden states, then projected: the projector's last input is the merged rows
    torch.testing.assert_close(proj_in[-1].double().reshape(len(kept), -1), rows, atol=1e-5, rtol=1e-4)


def test_engine_without_outliers_takes_the_top_token(engine_for):
    """The official code divides by zero when no patch is an outlier; ours reads the top patch as the one."""
    engine, img = engine_for("llava"), noise_image(3)
    fl = engine.adapter.feature_layer
    q, k, hidden = _eager_official_signals(engine.model, engine.prepare("what", images=[img])["pixel_values"], fl)
    a = official_cls_attn(q.double(), k.double())
    assert official_outlier_ratio(a.float()) == 0
    idx = [int(a.argmax())]
    idx += [s for s in range(0, 63, int(int(64 / 1) / 3)) if s not in idx]  # ratio 1 / 64
    out, extra = official_merge(hidden.double(), k[1:].double(), a, idx)
    kept, rows, _ = engine_view(idx, out, extra, 64)
    res, proj_in = _engine_run(engine, img, "prumerge:keep=auto")
    assert res.kept[0].tolist() == kept
    torch.testing.assert_close(proj_in[-1].double().reshape(len(kept), -1), rows, atol=1e-5, rtol=1e-4)

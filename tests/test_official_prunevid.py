"""PruneVid's merge stage against a reference written here from its official code path (our own
transcription, not a copy): Visual-AI/PruneVid ``models/pllava/modeling_pllava.py``
(``PllavaForConditionalGeneration.merge_frames_dynamic``, ``cluster_dpc_knn``, ``refine_clusters``,
``segment_lengths``, ``spatial_merge_tokens`` / ``compute_cluster_vectors``), with tau = 0.8,
temporal_segment_ratio = 0.25, cluster_ratio = 0.5, k = 7 as ``forward`` and scripts/eval.sh call it.
The reference also returns where each of its output tokens sits (a cluster at its centre, a static token
in its segment's first frame); kept sets compared exactly and merged features within 1e-5, at
LLaVA-OneVision's geometry (8 / 16 frames of 196) and the tiny models', then through the engine.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from PIL import Image
from tokensieve.pruners import StageInput, get_pruner
from tokensieve.pruners import prunevid as pv
from tokensieve.pruners.prunevid import PruneVidPruner

QUESTION = "what appeared first"


# ---- the official code path, transcribed (B = 1) -------------------------------------------------------------

def official_dpc_knn(x, cluster_num, k=7, jitter=0.0):
    """cluster_dpc_knn on x [1, N, C] -> (idx_cluster [N], index_down [cluster_num]); ``jitter`` scales the
    official rand * 1e-6 density noise (0: off, for a deterministic comparison)."""
    _, n, c = x.shape
    dist_matrix = torch.cdist(x.float(), x.float()) / (c ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=k, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape) * 1e-6 * jitter
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    picked = dist_matrix[0, index_down[0]]  # index_points(dist_matrix, index_down)
    idx_cluster = picked.argmin(dim=0)
    idx_cluster[index_down[0]] = torch.arange(cluster_num)
    return idx_cluster, index_down[0]


def official_refine(labels):
    """refine_clusters for one video: labels [N] -> refined [N]."""
    n = labels.numel()
    out = labels.clone()
    for lab in torch.unique(labels):
        idx = (labels == lab).nonzero(as_tuple=True)[0].tolist()
        segs, start, prev = [], idx[0], idx[0]
        for i in idx[1:]:
            if i == prev + 1:
                prev = i
            else:
                segs.append((start, prev))
                start = prev = i
        segs.append((start, prev))
        longest = max(e - s + 1 for s, e in segs)
        for s, e in segs:
            if longest == 1 or e - s + 1 != longest:
                out[s:e + 1] = -1
    i = 0
    while i < n:
        if out[i] == -1:
            start = i
            while i < n and out[i] == -1:
                i += 1
            end = i - 1
            left = right = None
            left_len = right_len = 0
            if start > 0:
                left = out[start - 1].item()
                j = start - 1
                while j >= 0 and out[j] == left:
                    j -= 1
                left_len = start - j - 1
            if end < n - 1:
                right = out[end + 1].item()
                j = end + 1
                while j < n and out[j] == right:
                    j += 1
                right_len = j - end - 1
            if left_len > right_len:
                new = left
            elif right_len > left_len:
                new = right
            else:
                new = left if left is not None else right
            out[start:end + 1] = 0 if new is None else new
        else:
            i += 1
    return out


def official_segment_lengths(labels):
    change = torch.where(labels[1:] != labels[:-1])[0] + 1
    bounds = torch.cat([torch.tensor([0]), change, torch.tensor([labels.numel()])])
    return (bounds[1:] - bounds[:-1]).tolist()


def official_spatial(feat, ratio=0.5, k=7):
    """spatial_merge_tokens when feat [1, n, C] has n > 14 -> (cluster means [1, c, C] in cluster order, centres)."""
    num = int(feat.shape[1] * ratio)
    idx, centres = official_dpc_knn(feat, num, k=min(k, feat.shape[1]))
    onehot = F.one_hot(idx, num_classes=num).to(feat.dtype)[None]
    sums = torch.bmm(onehot.permute(0, 2, 1), feat)
    counts = onehot.sum(dim=1)
    return sums / counts.clamp(min=1).unsqueeze(-1), centres


def official_prunevid(flat, t, tau=0.8, seg_ratio=0.25, cl_ratio=0.5, k=7):
    """merge_frames_dynamic on flat [T * L, C] -> (final features [M, C], the flat index where each output
    token sits [M], window sizes, static sizes); ``official_prunevid.dynamic_sizes``: the dynamic sizes."""
    c = flat.shape[-1]
    frames = flat.view(1, t, -1, c)
    n_pos = frames.shape[2]
    idx, _ = official_dpc_knn(frames.mean(dim=2), int(t * seg_ratio), k=min(k, t))
    windows = official_segment_lengths(official_refine(idx))
    feats, where, static_sizes = [], [], []
    official_prunevid.dynamic_sizes = []
    start = 0
    for w in windows:
        cur = frames[:, start:start + w]
        normed = F.normalize(cur, p=2, dim=-1)
        sim = torch.einsum("bwlc,btlc->bwtl", normed, normed)
        sim = (sim.sum(dim=-2) - 1).sum(dim=-2) / (w * (w - 1))
        mask = (sim > tau)[0]
        pos, dyn = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        static = cur[:, :, mask].mean(dim=1)
        slots = start * n_pos + pos
        if static.shape[1] > 14:
            static, centres = official_spatial(static, cl_ratio, k)
            slots = slots[centres]
        feats.append(static[0])
        where.append(slots)
        static_sizes.append(static.shape[1])
        for i in range(w):
            d = cur[:, i, ~mask]
            slots = (start + i) * n_pos + dyn
            if d.shape[1] > 14:
                d, centres = official_spatial(d, cl_ratio, k)
                slots = slots[centres]
            feats.append(d[0])
            where.append(slots)
        official_prunevid.dynamic_sizes.append(sum(x.numel() for x in where[-w:]))
        start += w
    return torch.cat(feats), torch.cat(where), windows, static_sizes


# ---- fixed signals -------------------------------------------------------------------------------------------

def video(t, n, d=64, seed=0, scene_len=(3, 5, 2, 6)):
    """[t*n, d] frame-major: scenes of the given lengths (cycled), each a new base; within a scene each position
    moves by its own noise level in [0.1, 1.2] (low: static, high: dynamic); frames [t*n]."""
    g = torch.Generator().manual_seed(seed)
    out, f, s = [], 0, 0
    while f < t:
        base = torch.randn(n, d, generator=g)
        level = 0.1 + 1.1 * torch.rand(n, 1, generator=g)
        for _ in range(min(scene_len[s % len(scene_len)], t - f)):
            out.append(base + level * torch.randn(n, d, generator=g))
            f += 1
        s += 1
    return torch.cat(out), torch.arange(t).repeat_interleave(n)


def grid_coords(t, side, extra_last=0):
    rows = [[f, i // side, i % side] for f in range(t) for i in range(side * side)]
    rows += [[t - 1, side - 1, side + e] for e in range(extra_last)]
    return torch.tensor(rows)


def run(x, fr, coords, keep, **options):
    return get_pruner("prunevid").select(StageInput(tokens=x, keep=keep, coords=coords, frames=fr, options=options))


def assert_official(sel, ref_feats, ref_where):
    order = ref_where.argsort()
    assert sel.keep_idx.tolist() == ref_where[order].tolist()
    torch.testing.assert_close(sel.tokens.float(), ref_feats[order].float(), atol=1e-5, rtol=1e-5)


CASES = [(8, 14), (16, 14), (12, 14), (32, 14), (8, 8), (16, 8), (8, 2)]


@pytest.mark.parametrize("t,side", CASES)
def test_prunevid_keeps_and_merges_what_merge_frames_dynamic_does(t, side):
    n = side * side
    x, fr = video(t, n, seed=t + side)
    feats, where, windows, static_sizes = official_prunevid(x, t)
    assert len(windows) > 1 and sum(static_sizes) > 0  # segments and static tokens in play
    sel = run(x, fr, grid_coords(t, side), None)  # keep=auto: the official counts
    assert_official(sel, feats, where)
    assert_official(run(x, fr, grid_coords(t, side), len(where)), feats, where)  # the official total, numeric
    if n == 196:
        assert 0.2 < len(where) / (t * n) < 0.45  # no budget parameter: lands near the paper's 28-37 %


def test_groups_partition_the_tokens_into_the_official_clusters():
    t, side = 8, 14
    n = side * side
    x, fr = video(t, n, seed=3)
    sel = run(x, fr, grid_coords(t, side), None)
    assert (sel.groups >= 0).all()  # nothing dropped: every token is in one merged token
    means = torch.zeros(sel.keep_idx.numel(), 64).index_add_(0, sel.groups, x)
    counts = torch.bincount(sel.groups).float()[:, None]
    torch.testing.assert_close(means / counts, sel.tokens, atol=1e-5, rtol=1e-5)  # mean over frames, then clusters


def test_refine_and_segments_match_the_official_on_random_labels():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        labels = torch.randint(0, 4, (int(torch.randint(1, 17, (1,), generator=g)),), generator=g)
        ref = official_refine(labels)
        assert pv.refine_labels(labels.tolist()) == ref.tolist()
        assert [e - s for _, s, e in pv._runs(ref.tolist())] == official_segment_lengths(ref)


def test_onevision_newline_and_images_are_kept_outside():
    t, side = 8, 14
    n = side * side
    x, fr = video(t, n, seed=5)
    feats, where, _, _ = official_prunevid(x, t)
    img = torch.randn(16, 64)
    xs = torch.cat([img, x, torch.randn(1, 64)])
    frs = torch.cat([torch.full((16,), -1), fr, torch.tensor([t - 1])])
    coords = torch.cat([torch.tensor([[0, i // 4, i % 4] for i in range(16)]), grid_coords(t, side, 1)])
    sel = run(xs, frs, coords, None)
    assert sel.keep_idx.tolist() == list(range(16)) + sorted((where + 16).tolist()) + [16 + t * n]


# ---- broken on purpose ---------------------------------------------------------------------------------------

def test_a_broken_prunevid_fails_the_comparison(monkeypatch):
    t, side = 16, 14
    x, fr = video(t, side * side, seed=30)
    feats, where, _, _ = official_prunevid(x, t)
    coords = grid_coords(t, side)
    assert_official(run(x, fr, coords, None), feats, where)
    assert run(x, fr, coords, None, tau=0.6).keep_idx.numel() != where.numel()  # wrong threshold

    def wrong_axis(window):  # frame pairs compared across positions instead of at the same position
        xn = F.normalize(window.float(), dim=-1)
        return torch.einsum("wlc,wmc->wlm", xn, xn).mean(dim=(0, 2))

    monkeypatch.setattr(pv, "pair_similarity", wrong_axis)
    with pytest.raises(AssertionError):
        assert_official(run(x, fr, coords, None), feats, where)
    monkeypatch.undo()
    real = pv.dpc_knn
    monkeypatch.setattr(pv, "dpc_knn", lambda x, c, knn=7: real(x, c, knn=2))  # wrong kernel width (k = 2)
    with pytest.raises(AssertionError):
        assert_official(run(x, fr, coords, None), feats, where)


# ---- our budget mapping where keep is not the official total -------------------------------------------------

def test_any_keep_is_met_exactly_and_partitions_the_tokens():
    t, side = 8, 14
    n = side * side
    x, fr = video(t, n, seed=11)
    coords = grid_coords(t, side)
    official = run(x, fr, coords, None).keep_idx.numel()
    for keep in [1, 7, 8, 100, official - 1, official + 1, 900, 1300, n * t - 1, n * t]:
        sel = run(x, fr, coords, keep)
        kept = sel.keep_idx.tolist()
        assert len(kept) == keep == len(set(kept)) and kept == sorted(kept)
        if keep == n * t:  # keep-everything: the identity
            assert sel.tokens is None and sel.groups is None
            continue
        assert sel.groups[sel.keep_idx].tolist() == list(range(keep))
        if keep >= 1300:  # past the unmerged groups' count: no spatial merge, static tokens released
            assert (sel.groups >= 0).all()
            means = torch.zeros(keep, 64).index_add_(0, sel.groups, x)
            counts = torch.bincount(sel.groups, minlength=keep).float()[:, None]
            torch.testing.assert_close(means / counts, sel.tokens, atol=1e-5, rtol=1e-5)


def test_any_keep_where_no_group_is_large_enough_to_merge():
    x, fr = video(8, 4, seed=4)  # OneVision's tiny geometry: every group <= 14 tokens, static ones averaged only
    for keep in range(1, 33):
        assert run(x, fr, grid_coords(8, 2), keep).keep_idx.numel() == keep


def test_keep_auto_never_keeps_nothing():
    x, fr = video(8, 64, seed=6)
    assert run(x, fr, grid_coords(8, 8), None, cluster_ratio=0.0, tau=1.0).keep_idx.numel() == 1


def test_image_request_treats_each_item_as_a_frame():
    x, fr = video(8, 64, seed=2)
    coords = grid_coords(8, 8)
    feats, where, _, _ = official_prunevid(x, 8)
    sel = get_pruner("prunevid").select(StageInput(tokens=x, keep=None, coords=coords))
    assert sel.keep_idx.tolist() == sorted(where.tolist())


# ---- through the engine: the features recomputed with the plain model -------------------------------------

def scene_frames(scenes=(3, 5), seed=50, amount=40):
    """Frames of noise scenes: each scene one random image, each frame of it with its own pixel noise."""
    out = []
    for s, length in enumerate(scenes):
        base = np.random.RandomState(seed + s).rand(40, 56, 3) * 255
        for i in range(length):
            noise = np.random.RandomState(100 * seed + 10 * s + i).randn(40, 56, 3) * amount
            out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8")))
    return out


def _caught(monkeypatch):
    caught = []
    real = PruneVidPruner.select
    monkeypatch.setattr(PruneVidPruner, "select", lambda self, inp: caught.append((inp, real(self, inp))) or caught[-1][1])
    return caught


@pytest.mark.parametrize("plan", ["prunevid:keep=auto", "official"])
def test_prunevid_through_the_engine_llava(engine_for, tiny_path, monkeypatch, plan):
    """Tiny LLaVA video (8 frames x 8x8): the projected features of the tower's feature layer, CLS dropped."""
    from transformers import AutoModelForImageTextToText

    engine = engine_for("llava")
    frames = scene_frames()
    pv_in = engine.prepare(QUESTION, video=frames)["pixel_values"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_path("llava")).eval()
    with torch.no_grad():
        hidden = model.model.vision_tower(pv_in, output_hidden_states=True).hidden_states
        feats = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])
    ref, where, windows, static_sizes = official_prunevid(feats.flatten(0, 1), 8)
    assert windows == [3, 5] and all(static_sizes)
    caught = _caught(monkeypatch)
    plan = f"prunevid:keep={len(where)}" if plan == "official" else plan
    res = engine.generate(QUESTION, video=frames, plan=plan, max_new_tokens=1)
    order = where.argsort()
    assert res.kept[0].tolist() == where[order].tolist()
    torch.testing.assert_close(caught[0][1].tokens.float(), ref[order], atol=1e-5, rtol=1e-5)


def test_prunevid_through_the_engine_qwen2_vl(engine_for, monkeypatch):
    """Tiny Qwen2-VL native video (16 frames: 8 temporal patches): the stage's input against the reference."""
    engine = engine_for("qwen2_vl")
    frames = scene_frames((6, 10), seed=80)
    caught = _caught(monkeypatch)
    res = engine.generate(QUESTION, video=frames, plan="prunevid:keep=auto", max_new_tokens=1)
    inp, sel = caught[0]
    t = int(inp.frames.max()) + 1
    assert t == 8 and (inp.frames >= 0).all()
    ref, where, windows, static_sizes = official_prunevid(inp.tokens.float(), t)
    assert windows == [3, 5] and all(static_sizes) and inp.tokens.shape[0] > 8 * 14  # spatial merges in play
    order = where.argsort()
    assert res.kept[0].tolist() == where[order].tolist() == sel.keep_idx.tolist()
    torch.testing.assert_close(sel.tokens.float(), ref[order], atol=1e-5, rtol=1e-5)


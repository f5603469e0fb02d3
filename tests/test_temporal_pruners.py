"""The temporal-merging video pruners `dycoke` and `fastvid` against plain references written here
from the official code paths (KD-TAO/DyCoke, LunarShen/FastVID), on fixed random features at
LLaVA-OneVision geometry (frames x 196 tokens) and tiny geometries; and once each through the engine."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import noise_image
from tokensieve.engine.state import check_selection
from tokensieve.pruners import REGISTRY, StageInput, get_pruner
from tokensieve.pruners.dycoke import dycoke_ttm, official_keep, reference_map
from tokensieve.pruners.fastvid import density_peaks, fastvid_budget, fastvid_select, segment_frames

GEOMETRIES = [(8, 196), (8, 64), (4, 16)]


def video(t, n, d=16, seed=0, images=0, extra_last=0):
    """[N, d] features (frames correlated in time, like a video), frames [N]; ``images`` still-image tokens first."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n + extra_last, d, generator=g)
    frames_x = []
    for f in range(t):
        m = n + (extra_last if f == t - 1 else 0)
        frames_x.append(base[:m] + 0.8 * (f + 1) / t * torch.randn(m, d, generator=g))
    x = torch.cat([torch.randn(images, d, generator=g)] + frames_x)
    fr = torch.cat([torch.full((images,), -1)] + [torch.full((m.shape[0],), f) for f, m in enumerate(frames_x)])
    return x, fr.long()


def coords_of(frames, n):
    """[N, 3] (frame, row, col) on a square-ish grid per frame (images as item -1 -> 0)."""
    rows = []
    for f in frames.unique(sorted=True).tolist():
        m = int((frames == f).sum())
        side = max(1, int(math.isqrt(n)))
        rows += [[max(f, 0), i // side, i % side] for i in range(m)]
    return torch.tensor(rows)


def cos(a, b):
    a, b = a.double().tolist(), b.double().tolist()
    return sum(u * v for u, v in zip(a, b)) / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)))


def valid(sel, n, keep):
    check_selection(sel, n, keep, "test")  # raises if malformed
    assert sel.keep_idx.numel() == keep


# ---- DyCoke ---------------------------------------------------------------------------------

def ref_dycoke(x, fr, keep, window=4):
    """Explicit loops after KD-TAO/DyCoke llava/model/llava_arch.py::dycole_ttm: pairs (frame i whole, i+1
    keeps its least-similar tokens to i), then windows of 4 (for i in range(0, T-4, 4): frame i+2 least
    similar to i); our budget: images, reference frames whole, the rest spread over compared frames."""
    t = int(fr.max()) + 1
    mem = [[i for i in range(len(fr)) if int(fr[i]) == f] for f in range(t)]
    ref = {}
    for i in range(0, t - 1, 2):
        ref[i + 1] = i
    if window == 4:
        for i in range(0, t - 4, 4):
            ref[i + 2] = i
    images = [i for i in range(len(fr)) if int(fr[i]) < 0]
    whole = [i for f in range(t) if f not in ref for i in mem[f]]
    compared = [f for f in range(t) if f in ref]
    rest = keep - len(images) - len(whole)
    assert rest >= 0, "reference only covers the official regime"
    sizes = [len(mem[f]) for f in compared]
    quota = [rest * s / sum(sizes) for s in sizes]
    counts = [int(q) for q in quota]
    for j in sorted(range(len(compared)), key=lambda j: -(quota[j] - counts[j]))[:rest - sum(counts)]:
        counts[j] += 1
    kept = images + whole
    for f, k in zip(compared, counts):
        r = mem[ref[f]]
        sims = [(cos(x[i], x[r[p]]) if p < len(r) else -2.0, p) for p, i in enumerate(mem[f])]
        kept += [mem[f][p] for _, p in sorted(sims)[:k]]
    return sorted(kept)


@pytest.mark.parametrize("t,n", GEOMETRIES)
def test_dycoke_official_budget_matches_official_ttm(t, n):
    """keep = the official K = 0.7 total: every compared frame keeps int(0.3 n), the official count."""
    x, fr = video(t, n)
    keep = official_keep(fr)
    ref = {8: [None, 0, 0, 2, None, 4, None, 6], 4: [None, 0, None, 2]}[t]
    assert reference_map(t) == ref
    assert keep == sum(n if r is None else int(0.3 * n) for r in ref)
    idx, scores = dycoke_ttm(x, fr, keep)
    assert idx.tolist() == ref_dycoke(x, fr, keep)
    for f, r in enumerate(ref):
        assert int((fr[idx] == f).sum()) == (n if r is None else int(0.3 * n))
    assert scores.shape == (fr.numel(),)


@pytest.mark.parametrize("t,n", GEOMETRIES)
@pytest.mark.parametrize("ratio", [0.55, 0.8, 1.0])
def test_dycoke_any_keep_matches_reference(t, n, ratio):
    x, fr = video(t, n, seed=1)
    n_whole = n * sum(r is None for r in reference_map(t))
    keep = max(n_whole, int(ratio * t * n))
    idx, _ = dycoke_ttm(x, fr, keep)
    assert idx.tolist() == ref_dycoke(x, fr, keep)
    sel = get_pruner("dycoke").select(StageInput(tokens=x, keep=keep, coords=coords_of(fr, n), frames=fr))
    valid(sel, fr.numel(), keep)
    assert torch.equal(sel.keep_idx, idx)


def test_dycoke_window_2_is_pairs_only():
    x, fr = video(8, 64, seed=2)
    assert reference_map(8, 2) == [None, 0, None, 2, None, 4, None, 6]
    assert reference_map(8, 8) == [None, 0, 0, 2, None, 4, None, 6]  # 8 frames: the 8-window step does not run
    assert reference_map(16, 8)[4] == 0 and reference_map(16, 8)[12] is None
    keep = 300
    assert dycoke_ttm(x, fr, keep, window=2)[0].tolist() == ref_dycoke(x, fr, keep, window=2)


def test_dycoke_images_always_kept_and_onevision_newline():
    """Still-image tokens (frames -1) are kept and count toward keep; OneVision's newline token (one more
    token in the last frame) has no counterpart in the reference frame and is kept first."""
    x, fr = video(8, 196, seed=3, images=20, extra_last=1)
    n = fr.numel()
    for keep in (3 * 196 + 20 + 1, 2000, n):
        idx, _ = dycoke_ttm(x, fr, keep)
        assert idx.tolist() == ref_dycoke(x, fr, keep)
        assert set(range(20)) <= set(idx.tolist()) and (n - 1) in idx.tolist()


def test_dycoke_below_reference_frames_thins_them_evenly():
    x, fr = video(4, 16, seed=4, images=6)
    c = coords_of(fr, 16)
    whole = [i for i in range(fr.numel()) if int(fr[i]) in (0, 2)]  # 4 frames: pairs only -> frames 0, 2 whole
    for keep in (6 + 32, 6 + 20, 6 + 1):
        idx, _ = dycoke_ttm(x, fr, keep, coords=c)
        assert idx.numel() == keep and set(range(6)) <= set(idx.tolist())
        assert set(idx.tolist()[6:]) <= set(whole)
        per = [int((fr[idx] == f).sum()) for f in range(4)]
        assert per[1] == per[3] == 0 and abs(per[0] - per[2]) <= 1
    idx, _ = dycoke_ttm(x, fr, 4)  # fewer than the image tokens: an even stride over them
    assert idx.tolist() == [0, 2, 3, 5]  # positions ((0..3) + 0.5) * 6 / 4
    sel = get_pruner("dycoke").select(StageInput(tokens=x, keep=10, coords=c, frames=fr))
    valid(sel, fr.numel(), 10)


def test_dycoke_without_frames_uses_item_index():
    x, fr = video(4, 16, seed=5)
    keep = 40
    sel = get_pruner("dycoke").select(StageInput(tokens=x, keep=keep, coords=coords_of(fr, 16)))
    assert sel.keep_idx.tolist() == ref_dycoke(x, fr, keep)


# ---- FastVID --------------------------------------------------------------------------------

def unit(deg):
    return torch.tensor([math.cos(math.radians(deg)), math.sin(math.radians(deg)), 0.0])


def test_fastvid_segmentation_hand_example():
    # consecutive cosines: cos10 .985, cos12 .978, cos38 .788, cos5 .996, cos55 .574
    scale = torch.tensor([[1.0], [2.0], [1.0], [3.0], [1.0], [0.5]])  # norms do not matter
    g = torch.stack([unit(a) for a in (0, 10, 22, 60, 65, 120)]) * scale
    assert segment_frames(g, c=2, tau=0.9) == [(0, 3), (3, 5), (5, 6)]  # lowest one (t=4) + below tau (t=2, 4)
    assert segment_frames(g, c=4, tau=0.5) == [(0, 2), (2, 3), (3, 5), (5, 6)]  # the 3 lowest: t=4, 2, 1
    assert segment_frames(g, c=1, tau=0.0) == [(0, 6)]
    assert segment_frames(g, c=8, tau=0.9) == [(i, i + 1) for i in range(6)]  # c - 1 > T - 1: every frame
    assert segment_frames(g[:1]) == [(0, 1)]


def ref_density_peaks(x, k, knn=4):
    """Brute force DPC-KNN after LunarShen/FastVID modeling_qwen2.py (cdist / sqrt(D), knn incl. self)."""
    m, d = x.shape
    rows = x.double().tolist()
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j]))) / math.sqrt(d) for j in range(m)]
            for i in range(m)]
    rho = [math.exp(-sum(v ** 2 for v in sorted(dist[i])[:min(knn, m)]) / min(knn, m)) for i in range(m)]
    dmax = max(max(r) for r in dist)
    delta = [min([dist[i][j] for j in range(m) if rho[j] > rho[i]] + [dmax]) for i in range(m)]
    score = [rho[i] * delta[i] for i in range(m)]
    return sorted(range(m), key=lambda i: (-score[i], i))[:k]


@pytest.mark.parametrize("m,k,knn", [(30, 5, 4), (12, 12, 4), (7, 2, 3), (3, 1, 4)])
def test_fastvid_density_peaks_brute_force(m, k, knn):
    x = torch.randn(m, 8, generator=torch.Generator().manual_seed(m))
    assert density_peaks(x, k, knn).tolist() == ref_density_peaks(x, k, knn)


def test_fastvid_budget_hand_example():
    segs = [(0, 3), (3, 5), (5, 6)]
    # R = 4 a frame: 3 salient + int(1.6) = 1 context; p = 2: anchors {0, 2}, {4}, {5}; 3 -> [2, 1]
    assert fastvid_budget([10] * 6, segs, 24, d=0.4, p=2) == ([3] * 6, [2, 0, 1, 0, 2, 1])
    # keep everything: anchors full (4 non-salient each), the excess becomes salient in the other frames
    s, c = fastvid_budget([10] * 6, segs, 60, d=0.4, p=2)
    assert c == [4, 0, 4, 0, 4, 4] and s == [6, 10, 6, 10, 6, 6]
    # official LLaVA-OV count: 10 % of 196 = 19 = 12 salient + 7 context; 32 frames in 8 segments of 4, p = 4
    s, c = fastvid_budget([196] * 32, [(i, i + 4) for i in range(0, 32, 4)], 19 * 32)
    assert s == [12] * 32 and c == [0, 0, 0, 28] * 8


def ref_fastvid(x, fr, scores, keep, c, tau, d, p, beta, knn=4):
    """Plain reference after LunarShen/FastVID modeling_qwen2.py (DySeg, STPrune, DPC, DTM), equal frames,
    keep a multiple of T; frame features = score-weighted means (our surrogate of the SigLIP head)."""
    t = int(fr.max()) + 1
    mem = [[i for i in range(len(fr)) if int(fr[i]) == f] for f in range(t)]
    n = len(mem[0])
    feats = []
    for m in mem:
        w = [float(scores[i]) for i in m]
        feats.append(sum(x[i].double() * (wi / sum(w)) for i, wi in zip(m, w)))
    sims = [cos(feats[i], feats[i + 1]) for i in range(t - 1)]
    cuts = set(sorted(range(t - 1), key=lambda i: (sims[i], i))[:min(c - 1, t - 1)])
    cuts |= {i for i in range(t - 1) if sims[i] < tau}
    bounds = [0] + [i + 1 for i in sorted(cuts)] + [t]
    r = keep // t
    s_n, c_n = r - int(r * d), int(r * d)
    kept, merged, groups = [], {}, {}
    salient_of, rest_of = [], []
    for m in mem:
        order = sorted(m, key=lambda i: (-float(scores[i]), i))
        salient_of.append(order[:s_n])
        rest_of.append(sorted(order[s_n:]))
        kept += order[:s_n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        anchors = [j for j in range(a, b) if (b - 1 - j) % p == 0]
        share = c_n * (b - a)
        assert share <= len(anchors) * (n - s_n)
        each = [share // len(anchors) + (1 if q < share % len(anchors) else 0) for q in range(len(anchors))]
        pool = [i for j in range(a, b) for i in rest_of[j]]
        seg_targets = []
        for j, k in zip(anchors, each):
            cand = rest_of[j]
            targets = [cand[q] for q in ref_density_peaks(x[cand], k, knn)]
            assign = {tt: [] for tt in targets}
            for i in pool:
                assign[max(targets, key=lambda tt: (cos(x[i], x[tt]), -targets.index(tt)))].append(i)
            for tt in targets:
                cnt = len(assign[tt])
                alpha = max(1 / (cnt + 1), beta)
                mean = sum(x[i].double() for i in assign[tt]) / cnt
                merged[tt] = alpha * x[tt].double() + (1 - alpha) * mean
            seg_targets += targets
        for i in pool:
            groups[i] = max(seg_targets, key=lambda tt: (cos(x[i], x[tt]), -seg_targets.index(tt)))
        kept += seg_targets
    return sorted(kept), merged, groups


@pytest.mark.parametrize("t,n,keep", [(8, 196, 8 * 20), (8, 64, 8 * 10), (4, 16, 4 * 5)])
@pytest.mark.parametrize("c,tau,p", [(8, 0.9, 4), (2, -1.0, 2), (3, 0.95, 4)])
def test_fastvid_matches_reference(t, n, keep, c, tau, p):
    x, fr = video(t, n, seed=7)
    scores = torch.rand(fr.numel(), generator=torch.Generator().manual_seed(8))
    idx, tokens, groups = fastvid_select(x, fr, scores, keep, c=c, tau=tau, d=0.4, p=p, beta=0.6)
    ref_kept, ref_merged, ref_groups = ref_fastvid(x, fr, scores, keep, c, tau, 0.4, p, 0.6)
    assert idx.tolist() == ref_kept
    pos = {i: q for q, i in enumerate(idx.tolist())}
    for q, i in enumerate(idx.tolist()):
        want = ref_merged[i].float() if i in ref_merged else x[i]
        torch.testing.assert_close(tokens[q], want, atol=1e-5, rtol=1e-5)
        assert int(groups[i]) == q
    for i, tt in ref_groups.items():
        assert int(groups[i]) == pos[tt]
    assert int((groups >= 0).sum()) == fr.numel()  # every token is kept or merged (none dropped)


def fastvid_input(t, n, keep, seed=9, images=0, **options):
    x, fr = video(t, n, seed=seed, images=images)
    score = torch.rand(fr.numel(), generator=torch.Generator().manual_seed(seed))
    return StageInput(tokens=x, keep=keep, coords=coords_of(fr, n), frames=fr, tower_score=score, options=options)


@pytest.mark.parametrize("t,n", GEOMETRIES)
@pytest.mark.parametrize("ratio", [0.02, 0.1, 0.37, 1.0])
def test_fastvid_exact_budget_and_groups(t, n, ratio):
    inp = fastvid_input(t, n, max(1, int(ratio * (t * n + 5))), images=5)
    sel = get_pruner("fastvid").select(inp)
    valid(sel, inp.tokens.shape[0], inp.keep)
    assert set(range(5)) <= set(sel.keep_idx.tolist()) or inp.keep < 5
    g = sel.groups
    assert bool(((g >= -1) & (g < inp.keep)).all())
    kept_pos = sel.keep_idx.tolist()
    for i in range(5):  # image tokens stand for themselves, features untouched
        if i in kept_pos:
            torch.testing.assert_close(sel.tokens[kept_pos.index(i)], inp.tokens[i])
    if ratio == 1.0:
        assert sel.keep_idx.tolist() == list(range(inp.tokens.shape[0]))
        torch.testing.assert_close(sel.tokens, inp.tokens)


def test_fastvid_merged_token_lies_between_target_and_group_mean():
    """Single-frame segments (defaults at 8 frames): each context token = alpha x + (1 - alpha) mean(group),
    alpha = max(1 / (count + 1), 0.6), and its group is exactly the tokens recorded in ``groups``."""
    inp = fastvid_input(8, 64, 8 * 10)
    sel = get_pruner("fastvid").select(inp)
    x, g = inp.tokens, sel.groups
    for q, i in enumerate(sel.keep_idx.tolist()):
        members = (g == q).nonzero().flatten()
        if members.numel() > 1:
            alpha = max(1 / (members.numel() + 1), 0.6)
            want = alpha * x[i] + (1 - alpha) * x[members].mean(0)
            torch.testing.assert_close(sel.tokens[q], want, atol=1e-5, rtol=1e-5)


def test_fastvid_without_frames_and_keep_below_images():
    inp = fastvid_input(4, 16, 30)
    inp.frames = None  # item index = frame
    a = get_pruner("fastvid").select(inp)
    inp2 = fastvid_input(4, 16, 30)
    b = get_pruner("fastvid").select(inp2)
    assert torch.equal(a.keep_idx, b.keep_idx) and torch.equal(a.groups, b.groups)
    inp3 = fastvid_input(4, 16, 3, images=6)
    sel = get_pruner("fastvid").select(inp3)
    valid(sel, inp3.tokens.shape[0], 3)
    assert max(sel.keep_idx.tolist()) < 6


# ---- registry and engine ----------------------------------------------------------------------

def test_registered():
    assert REGISTRY["dycoke"].wheres == ("pre_llm",) and REGISTRY["fastvid"].wheres == ("pre_llm",)
    assert get_pruner("dycoke").name == "dycoke" and get_pruner("fastvid").name == "fastvid"


@pytest.mark.parametrize("name", ["dycoke", "fastvid"])
def test_engine_video(engine_for, name):
    engine = engine_for("llava")
    res = engine.generate("what appeared first", video=[noise_image(i) for i in range(4)], plan=f"{name}:keep=0.25",
                          max_new_tokens=2)
    assert res.kept[0].numel() == 64
    if name == "fastvid":
        assert res.groups[0].numel() == 256 and int((res.groups[0] >= 0).sum()) >= 64

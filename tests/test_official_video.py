"""The video pruners against references written here from their official code paths (our own
transcriptions, not copies), at video geometry: the tiny models' 8 frames x 8x8 tokens, LLaVA-OneVision's
frames of 14x14 = 196 and Qwen-like 13x13 = 169 tokens. Kept sets compared exactly, merged / resized tokens
within tolerance; then once each through the engine, with the signal (frame features, CLS attention,
CLIP embeddings) recomputed here with plain transformers / open_clip.

- DyCoke:  KD-TAO/DyCoke        llava/model/llava_arch.py::dycole_ttm (K = 0.7, frames of n tokens)
- FastVID: LunarShen/FastVID    fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py,
           Qwen2Model.forward, block "FastVID" (defaults of lmms-eval/lmms_eval/models/llava_onevision.py)
- QuoTA:   MAC-AutoML/QuoTA     core/llava_arch.py::token_compress (version "v1") with quota_pipeline.py's
           weights (100 p)^2
- KeyScore: no official code; the paper's formulas (arXiv 2510.06509, as pruners/keyscore.py cites them).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import noise_image
from reference import clip_tower_attention
from tokensieve.pruners import StageInput, get_pruner
from tokensieve.pruners.fastvid import FastVIDPruner, fastvid_select
from tokensieve.pruners.frame_budget import FrameBudgetPruner, resize_frame
from tokensieve.pruners.keyscore import keyscore

QUESTION = "what appeared first"


def video(t, n, d=32, seed=0):
    """[t*n, d] frame-major features of a video (each frame its predecessor plus noise), frames [t*n]."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(n, d, generator=g)]
    for _ in range(t - 1):
        x.append(x[-1] + 0.6 * torch.randn(n, d, generator=g))
    return torch.cat(x), torch.arange(t).repeat_interleave(n)


def grid_coords(t, side, extra_last=0):
    """[t*side*side (+extra), 3] (frame, row, col) raster coords; extras after the last frame's grid at col side."""
    rows = [[f, i // side, i % side] for f in range(t) for i in range(side * side)]
    rows += [[t - 1, side - 1, side + e] for e in range(extra_last)]
    return torch.tensor(rows)


def cosine(a, b):
    """Row-wise cosine in float64 ([M, D] x [M, D] -> [M])."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


# ---- DyCoke -------------------------------------------------------------------------------------

def official_dycoke(x, t, n, k=0.7):
    """dycole_ttm on x [t*n, D]: the indices of the tokens it returns. Pass 1, for i in range(0, t-1, 2):
    frame i whole, frame i+1 its int((1-k) n) tokens least similar to the same position of frame i
    (topk largest=False). Pass 2, for i in range(0, t-4, 4): slot i+2 replaced by frame i+2's tokens least
    similar to frame i. An odd last frame is never appended (dropped)."""
    keep = int((1 - k) * n)

    def frame(i):
        return list(range(i * n, (i + 1) * n))

    def least_similar(ref, f):
        sim = cosine(x[frame(ref)], x[frame(f)])
        return [f * n + q for q in sorted(range(n), key=lambda q: float(sim[q]))[:keep]]

    out = []
    for i in range(0, t - 1, 2):
        out += [frame(i), least_similar(i, i + 1)]
    for i in range(0, t - 4, 4):
        out[i], out[i + 2] = frame(i), least_similar(i, i + 2)
    return sorted(q for part in out for q in part)


@pytest.mark.parametrize("t,side", [(8, 8), (6, 8), (32, 14), (16, 13), (12, 14)])
def test_dycoke_selects_what_dycole_ttm_keeps(t, side):
    n = side * side
    x, fr = video(t, n, seed=t + side)
    ref = official_dycoke(x, t, n)
    sel = get_pruner("dycoke").select(StageInput(tokens=x, keep=len(ref), coords=grid_coords(t, side), frames=fr))
    assert sel.keep_idx.tolist() == ref


def test_dycoke_odd_last_frame_is_kept_whole_where_the_official_drops_it():
    """Documented difference: dycole_ttm never appends an odd last frame; here it is a reference frame."""
    t, side = 7, 8
    n = side * side
    x, fr = video(t, n, seed=3)
    ref = official_dycoke(x, t, n)
    sel = get_pruner("dycoke").select(StageInput(tokens=x, keep=len(ref) + n, coords=grid_coords(t, side), frames=fr))
    assert sel.keep_idx.tolist() == ref + list(range(6 * n, 7 * n))


# ---- FastVID ------------------------------------------------------------------------------------

def official_fastvid(x, attn, g, t, n, ratio=0.10, c=8, tau=0.9, d=0.4, p=4, beta=0.6):
    """The FastVID block on the video's tokens x [t*n, D], salient scores attn [t*n], frame features g [t, E]
    -> (kept indices sorted, {kept index: merged feature}). Frame retain R = int(n ratio), salient
    S = R - int(R d), context C = R - S; segment of L frames: anchors (L-1-j) % p == 0 get C*L // ceil(L/p)
    each; anchors whose count is C merge their own frame's non-salient tokens ("single-frame"), anchors with
    more merge the whole segment's (each anchor separately); the rest of the non-salient tokens go."""
    dim = x.shape[1]
    gn = g.double() / g.double().norm(dim=1, keepdim=True)
    sim = (gn[:-1] * gn[1:]).sum(1).tolist()
    cuts = set(sorted(range(t - 1), key=lambda i: sim[i])[:c - 1]) | {i for i in range(t - 1) if sim[i] < tau}
    ends = sorted(cuts) + [t - 1]
    sizes = [b - a for a, b in zip([-1] + ends[:-1], ends)]
    r = int(n * ratio)
    s_num = r - int(r * d)
    c_num = r - s_num
    count, off = [0] * t, 0
    for length in sizes:
        for j in range(length):
            if (length - 1 - j) % p == 0:
                count[off + j] = c_num * length // ((length + p - 1) // p)
        off += length
    kept, rest, dens = [], [], []
    for f in range(t):
        idx = list(range(f * n, (f + 1) * n))
        order = sorted(idx, key=lambda i: -float(attn[i]))
        kept += order[:s_num]
        others = sorted(order[s_num:])
        rest.append(others)
        xr = x[others].double()
        dist = ((xr[:, None] - xr[None]) ** 2).sum(-1).sqrt() / math.sqrt(dim)
        rho = torch.exp(-(dist.sort(1).values[:, :4] ** 2).mean(1))
        denser = rho[None, :] > rho[:, None]
        delta = torch.where(denser, dist, dist.max()).min(1).values
        dens.append((delta * rho).tolist())
    merged = {}

    def merge(anchor, k, pool):
        order = sorted(range(len(rest[anchor])), key=lambda q: -dens[anchor][q])[:k]
        targets = [rest[anchor][q] for q in order]
        xt = x[targets].double()
        xt_n = xt / xt.norm(dim=1, keepdim=True)
        xp = x[pool].double()
        to = (xp / xp.norm(dim=1, keepdim=True) @ xt_n.T).argmax(1)
        for q, i in enumerate(targets):
            members = xp[to == q]
            cnt = members.shape[0]
            alpha = max(1 / (cnt + 1), beta)
            merged[i] = alpha * xt[q] + (1 - alpha) * (members.sum(0) / max(cnt, 1))
        kept.extend(targets)

    for f in range(t):
        if count[f] == c_num and c_num > 0:
            merge(f, c_num, rest[f])
    off = 0
    for length in sizes:
        seg = range(off, off + length)
        if length > 1:
            pool = [i for f in seg for i in rest[f]]
            for f in seg:
                if count[f] > c_num:
                    merge(f, count[off + length - 1], pool)
        off += length
    return sorted(kept), merged


def segment_features(lengths, dim=16, seed=0):
    """[sum(lengths), dim] frame features: near-equal within a segment, unrelated across segments."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(1, dim, generator=g) + 0.05 * torch.randn(length, dim, generator=g)
                      for length in lengths])


def check_fastvid(x, fr, attn, g, t, n, keep=None, **kw):
    ref_kept, ref_merged = official_fastvid(x, attn, g, t, n, **kw)
    opts = {k: kw[k] for k in ("c", "tau", "d", "p", "beta") if k in kw}
    idx, tokens, _ = fastvid_select(x, fr, attn, keep or len(ref_kept), frame_feats=g, **opts)
    return ref_kept, ref_merged, idx.tolist(), tokens


# segments: 8 frames, c = 8: every frame its own; 32 x 196: 8 segments, lengths 1..8 (anchors split evenly);
# 16 x 169 with c = 3: segments of 2, 5, 9 frames (2 and 3 anchors)
@pytest.mark.parametrize("t,side,lengths,c", [(8, 8, [2, 3, 3], 8), (32, 14, [1, 2, 3, 4, 6, 8, 4, 4], 8),
                                              (16, 13, [2, 5, 9], 3)])
def test_fastvid_selects_and_merges_what_the_official_block_does(t, side, lengths, c):
    n = side * side
    x, fr = video(t, n, seed=side)
    attn = torch.rand(t * n, generator=torch.Generator().manual_seed(side))
    g = segment_features(lengths, seed=side)
    ref_kept, ref_merged, kept, tokens = check_fastvid(x, fr, attn, g, t, n, c=c)
    assert len(ref_kept) == t * int(0.1 * n)  # the official count: int(10 % of n) a frame
    assert kept == ref_kept
    for q, i in enumerate(kept):
        want = ref_merged[i].float() if i in ref_merged else x[i]
        torch.testing.assert_close(tokens[q], want, atol=1e-5, rtol=1e-5)


def test_fastvid_anchor_remainder_is_kept_here_and_dropped_officially():
    """Documented difference: a segment of 5 frames (2 anchors) at 196 tokens has C*L = 7*5 = 35 context
    tokens; the official gives each anchor 35 // 2 = 17 (drops one), keep = T*19 here gives the first 18."""
    t, side = 16, 14
    n = side * side
    x, fr = video(t, n, seed=5)
    attn = torch.rand(t * n, generator=torch.Generator().manual_seed(5))
    g = segment_features([5, 1, 1, 2, 1, 1, 1, 4], seed=5)
    ref_kept, ref_merged, kept, tokens = check_fastvid(x, fr, attn, g, t, n, keep=t * 19)
    assert len(ref_kept) == t * 19 - 1 and set(ref_kept) < set(kept)
    (extra,) = set(kept) - set(ref_kept)
    assert int(fr[extra]) == 0  # the segment's first anchor (frames 0..4: anchors 0 and 4)
    for q, i in enumerate(kept):
        if int(fr[i]) != 0 and i in ref_merged:  # the other anchors' merges are the official ones
            torch.testing.assert_close(tokens[q], ref_merged[i].float(), atol=1e-5, rtol=1e-5)


# ---- QuoTA ---------------------------------------------------------------------------------------

def official_budgets(p, total):
    """quota_pipeline.py's weights (100 p)^2, normalised (numpy float64), then token_compress's
    cur_token = int(total * w_i) per frame; also each frame's unrounded share total * w_i."""
    weights = np.array([(v * 100) ** 2 for v in p])
    weights /= weights.sum(axis=0, keepdims=True)
    return [int(total * w) for w in weights], [float(total * w) for w in weights]


def official_resize(frame_x, side, cur):
    """token_compress v1 on one frame's side x side tokens [side*side, D]: h' = w' = int(sqrt(cur)), one
    more row if it fits, else one more column; F.interpolate bilinear -> [h'*w', D] (None if cur <= 0)."""
    if cur <= 0:
        return None
    th = tw = int(math.sqrt(cur))
    if th * tw < cur:
        if (th + 1) * tw <= cur:
            th += 1
        elif th * (tw + 1) <= cur:
            tw += 1
    dim = frame_x.shape[1]
    img = frame_x.view(side, side, dim).permute(2, 0, 1)[None]
    return F.interpolate(img, size=[th, tw], mode="bilinear")[0].reshape(dim, th * tw).T


def official_token_compress_v1(x, side, p, total):
    """token_compress(version="v1") over frames of side x side tokens (x [t*side*side, D]): per frame
    (budget, resized tokens | None)."""
    n = side * side
    return [(b, official_resize(x[f * n:(f + 1) * n], side, b)) for f, b in enumerate(official_budgets(p, total)[0])]


@pytest.mark.parametrize("t,side,p,total", [
    (8, 8, [0.125, 0.25, 0.5, 0.375, 0.25, 0.125, 0.5, 0.375], 180),  # dyadic p: the floors sum to total
    (16, 14, [0.25, 0.5, 0.375, 0.0, 0.125, 0.5, 0.25, 0.375] * 2, 590),
    (32, 13, [0.5, 0.25, 0.375, 0.125] * 8, 1680)])
def test_quota_resizes_frames_as_token_compress_v1(t, side, p, total):
    n = side * side
    x, fr = video(t, n, seed=side)
    official = official_token_compress_v1(x, side, p, total)
    assert sum(b for b, _ in official) == total and max(b for b, _ in official) <= n  # the regime compared
    inp = StageInput(tokens=x, keep=total, coords=grid_coords(t, side), frames=fr,
                     frame_relevance=torch.tensor(p, dtype=torch.float32))
    sel = get_pruner("quota").select(inp)
    kept_frames = fr[sel.keep_idx]
    for f, (budget, want) in enumerate(official):
        mine = sel.tokens[kept_frames == f]
        if want is None:
            assert mine.shape[0] == 0
        else:
            torch.testing.assert_close(mine, want, atol=1e-5, rtol=1e-5)


def test_quota_resize_keeps_the_onevision_newline_and_resizes_the_grid():
    """A frame of 14x14 tokens plus LLaVA-OneVision's newline: the grid is resized as the official v1 does
    (which appends its newlines after), the newline kept as it is."""
    x = torch.randn(197, 8, generator=torch.Generator().manual_seed(1))
    coords = grid_coords(1, 14, extra_last=1)
    idx, tokens, groups = resize_frame(x, coords, 50)
    want = F.interpolate(x[:196].T.reshape(1, 8, 14, 14), size=(7, 7), mode="bilinear").reshape(8, 49).T
    assert idx.numel() == 50 and int(idx[-1]) == 196 and int(groups[196]) == 49
    torch.testing.assert_close(tokens[:49], want)
    torch.testing.assert_close(tokens[49], x[196])


# ---- KeyScore (no official code: the paper's formulas) ---------------------------------------------

def paper_keyscore(frames, text, a=1 / 3, b=1 / 3, c=1 / 3):
    """S_sem = cos(f_i, t); S_temp = cos(f_i, v), v the mean-pooled video embedding; S_drop = cos(v, t) -
    cos(v without frame i, t); each min-max normalised, then a S_sem + b S_temp + c S_drop."""
    f = [row / row.norm() for row in frames.double()]
    q = text.double() / text.double().norm()
    v = sum(f) / len(f)

    def cos(u, w):
        return float(u @ w / (u.norm() * w.norm()))

    sem = [cos(fi, q) for fi in f]
    temp = [cos(fi, v) for fi in f]
    drop = [cos(v, q) - cos(sum(f[j] for j in range(len(f)) if j != i) / (len(f) - 1), q) for i in range(len(f))]

    def minmax(xs):
        return [(x - min(xs)) / (max(xs) - min(xs)) for x in xs]

    return torch.tensor([a * s + b * tt + c * dd for s, tt, dd in zip(minmax(sem), minmax(temp), minmax(drop))],
                        dtype=torch.float64)


@pytest.mark.parametrize("t", [8, 16, 32])
def test_keyscore_is_the_papers_score_and_picks_its_keyframes(t):
    gen = torch.Generator().manual_seed(t)
    frames_e, text_e = torch.randn(t, 64, generator=gen), torch.randn(64, generator=gen)
    ref = paper_keyscore(frames_e, text_e)
    torch.testing.assert_close(keyscore(frames_e, text_e), ref)
    x, fr = video(t, 64, seed=t)
    inp = StageInput(tokens=x, keep=4 * 16, coords=grid_coords(t, 8), frames=fr, frame_embeds=frames_e,
                     text_embed=text_e, options={"keyframes": 4, "within": "uniform"})
    sel = get_pruner("keyscore").select(inp)
    best = sorted(sorted(range(t), key=lambda i: -float(ref[i]))[:4])
    assert sorted(set(fr[sel.keep_idx].tolist())) == best


# ---- through the engine: the signals recomputed here ---------------------------------------------------

def tiny_llava_video(engine, path, n_frames):
    """The engine's pixel values for the video; per frame the projected features [T, 64, D] and the CLS
    attention (head mean) of the feature layer [T, 64], computed with the plain model's modules."""
    from transformers import AutoModelForImageTextToText

    frames = [noise_image(50 + i) for i in range(n_frames)]
    pv = engine.prepare(QUESTION, video=frames)["pixel_values"]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer  # -2: the hidden states entering the last layer
    attn, hidden = clip_tower_attention(tower, pv)
    with torch.no_grad():
        feats = model.model.multi_modal_projector(hidden[layer][:, 1:])
    cls = attn[len(hidden) - 1 + layer][:, :, 0, 1:].mean(1)  # the layer whose output is hidden[layer]
    return frames, feats, cls


def test_dycoke_through_the_engine(engine_for, tiny_path):
    engine = engine_for("llava")
    frames, feats, _ = tiny_llava_video(engine, tiny_path("llava"), 8)
    ref = official_dycoke(feats.flatten(0, 1), 8, 64)
    res = engine.generate(QUESTION, video=frames, plan=f"dycoke:keep={len(ref)}", max_new_tokens=1)
    assert res.kept[0].tolist() == ref


def test_dycoke_through_the_engine_onevision_newline(engine_for):
    """Native LLaVA-OneVision video: 8 frames of 2x2 pooled tokens, then the newline (kept by the official
    code, which merges before appending it): ours == official + the newline with keep one more."""
    engine = engine_for("llava_onevision")
    frames = [noise_image(60 + i) for i in range(8)]
    pv = engine.prepare(QUESTION, video=frames)["pixel_values_videos"]
    cfg = engine.model.config
    with torch.no_grad():
        feats = engine.model.model.get_video_features(pv, vision_feature_layer=cfg.vision_feature_layer,
                                                      vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = feats.pooler_output[0]  # [T * 4 + 1, D]: the frames' pooled tokens, then the newline
    assert feats.shape[0] == 8 * 4 + 1
    feats = feats[:32]
    ref = official_dycoke(feats, 8, 4)
    res = engine.generate(QUESTION, video=frames, plan=f"dycoke:keep={len(ref) + 1}", max_new_tokens=1)
    assert res.kept[0].tolist() == ref + [32]


def test_fastvid_through_the_engine(engine_for, tiny_path, monkeypatch):
    engine = engine_for("llava")
    frames, feats, cls = tiny_llava_video(engine, tiny_path("llava"), 8)
    x, attn = feats.flatten(0, 1), cls.flatten()
    g = torch.randn(8, 4)  # 8 frames, c = 8: every frame its own segment, whatever the frame features
    ref_kept, ref_merged = official_fastvid(x, attn, g, 8, 64)
    caught = []
    real = FastVIDPruner.select
    monkeypatch.setattr(FastVIDPruner, "select", lambda self, inp: caught.append(real(self, inp)) or caught[-1])
    res = engine.generate(QUESTION, video=frames, plan=f"fastvid:keep={len(ref_kept)}", max_new_tokens=1)
    assert res.kept[0].tolist() == ref_kept
    torch.testing.assert_close(res.scores[0].float(), attn, atol=1e-5, rtol=1e-4)
    for q, i in enumerate(ref_kept):
        want = ref_merged[i].float() if i in ref_merged else x[i]
        torch.testing.assert_close(caught[0].tokens[q].float(), want, atol=1e-4, rtol=1e-4)


def test_quota_through_the_engine(engine_for, tiny_path, monkeypatch):
    """The rating pass recomputed with the plain model (P("yes"), softmax over the full vocabulary), the
    frames' features with its modules; budgets: the official floors int(total w_i), plus (documented) the
    tokens they leave over, one each by largest fraction; each frame resized as token_compress v1 does."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    engine, path = engine_for("llava"), tiny_path("llava")
    frames, feats, _ = tiny_llava_video(engine, path, 4)
    prompt, total = "is there a red circle ?", 128
    model, proc = AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    yes = proc.tokenizer.convert_tokens_to_ids("yes")
    with torch.no_grad():
        p = [float(model(**proc(text=[text], images=[f], return_tensors="pt")).logits[0, -1].float().softmax(-1)[yes])
             for f in frames]
    floors, raw = official_budgets(p, total)
    assert max(raw) <= 64  # no cap in play
    budgets = list(floors)
    for f in sorted(range(4), key=lambda f: (-(raw[f] - floors[f]), f))[:total - sum(floors)]:
        budgets[f] += 1
    caught = []
    real = FrameBudgetPruner.select
    monkeypatch.setattr(FrameBudgetPruner, "select", lambda self, inp: caught.append(real(self, inp)) or caught[-1])
    plan = [dict(pruner="quota", keep=total, prompt=prompt, yes="yes", no="no")]
    res = engine.generate(QUESTION, video=frames, plan=plan, max_new_tokens=1)
    sel = caught[0]
    kept_frames = res.frames[sel.keep_idx]
    x = feats.flatten(0, 1)
    for f, b in enumerate(budgets):
        want = official_resize(x[f * 64:(f + 1) * 64], 8, b)
        torch.testing.assert_close(sel.tokens[kept_frames == f], want, atol=1e-4, rtol=1e-4)
    assert res.stats["tokens_per_frame"] == [int((kept_frames == f).sum()) for f in range(4)]


def test_keyscore_through_the_engine(engine_for):
    open_clip = pytest.importorskip("open_clip")
    from tokensieve.eval.shapeworld import shipped

    engine = engine_for("llava")
    frames = [noise_image(70 + i) for i in range(8)]
    res = engine.generate(QUESTION, video=frames, plan="keyscore:keep=0.5,within=uniform", max_new_tokens=1)
    name = "local-dir:" + shipped.path("clip")
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    with torch.no_grad():
        f = model.eval().encode_image(torch.stack([preprocess(im) for im in frames])).float()
        q = model.encode_text(open_clip.get_tokenizer(name)([QUESTION]))[0].float()
    want = torch.softmax(paper_keyscore(f, q) / 0.2, 0)
    vid = res.frames >= 0
    share = torch.stack([res.scores[0][vid][res.frames[vid] == i][0] for i in range(8)])
    torch.testing.assert_close(share.double(), want, atol=1e-5, rtol=1e-4)

"""VidCom2 against a reference written here from its official code path (our own transcription, not a copy):
xuyang-liu16/VidCom2 ``token_compressor/vidcom2/vidcom2.py::vidcom2_compression`` (model "llava_ov", linear
mapping; ``select_low_var_channels``, ``compute_gaussian_scores``, ``compute_scales``, ``select_outlier_indices``,
``_map_linear_offset``), as ``token_compressor/vidcom2/models/llava.py`` calls it on a video's pooled projected
frame features with base_scale = R_RATIO. Kept sets compared exactly at the tiny models' geometry (8 x 8x8,
8 x 2x2 + newline) and LLaVA-OneVision's (frames of 14x14 = 196, and 13x13 = 169) at 25 % and 10 %; then
through the engine, the features recomputed here with the plain transformers model's modules.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import noise_image
from tokensieve.pruners import StageInput, get_pruner
from tokensieve.pruners import vidcom2 as vc

QUESTION = "what appeared first"


def official_vidcom2(flat, tpf, base=0.25, temp=0.01):
    """vidcom2_compression(flat, "llava_ov"-like with tpf tokens a frame, base_scale=base) on flat [T * tpf, D]
    -> (the global indices of the tokens it returns, per-frame counts k, vid_score + frame_score [T, tpf])."""
    # select_low_var_channels(ratio=0.5)
    variances = flat.var(dim=0, unbiased=False)
    _, ch = torch.topk(variances, k=int(flat.shape[-1] * 0.5), largest=False)
    x = flat[:, ch]
    # compute_gaussian_scores
    frames = F.normalize(x.view(-1, tpf, x.shape[-1]), dim=-1)
    alphas = [2 ** k for k in range(-3, 2)]

    def kernel(center):
        d2 = ((frames - center) ** 2).sum(dim=-1)
        return sum(torch.exp(-d2 / (2 * a)) for a in alphas)

    vid_score = kernel(frames.mean(dim=(0, 1), keepdim=True))
    frame_score = kernel(frames.mean(dim=1, keepdim=True))
    # compute_scales(-vid_score.mean(-1), base, temp)
    s = -vid_score.mean(dim=-1)
    probs = F.softmax((s - s.max()) / temp, dim=0)
    scales = (base * (1 + probs - probs.mean())).clamp(max=1.0)
    # select_outlier_indices, then _map_linear_offset with stride flat.shape[0] // T
    sim = vid_score + frame_score
    ks = (scales * tpf).round().long().clamp(min=1).tolist()
    stride = flat.shape[0] // len(ks)
    out = []
    for i, k in enumerate(ks):
        _, idx = torch.topk(sim[i], k=k, largest=False, sorted=False)
        out.append(idx.sort().values + i * stride)
    return torch.cat(out).tolist(), ks, sim


def video(t, n, d=64, seed=0):
    """[t*n, d] frame-major features: a random walk over frames with uneven steps (some frames jump), frames [t*n]."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(n, d, generator=g)]
    for i in range(t - 1):
        step = 1.5 if i % 5 == 2 else 0.4
        x.append(x[-1] + step * torch.randn(n, d, generator=g) + 0.3 * torch.randn(1, d, generator=g))
    return torch.cat(x), torch.arange(t).repeat_interleave(n)


def grid_coords(t, side, extra_last=0):
    """[t*side*side (+extra), 3] (frame, row, col) raster coords; extras after the last frame's grid at col side."""
    rows = [[f, i // side, i % side] for f in range(t) for i in range(side * side)]
    rows += [[t - 1, side - 1, side + e] for e in range(extra_last)]
    return torch.tensor(rows)


def run(x, fr, coords, keep, **options):
    return get_pruner("vidcom2").select(StageInput(tokens=x, keep=keep, coords=coords, frames=fr, options=options))


CASES = [(8, 8, 0.25), (8, 8, 0.1), (16, 13, 0.25), (8, 14, 0.25), (32, 14, 0.25), (32, 14, 0.1), (24, 14, 0.1)]


@pytest.mark.parametrize("t,side,ratio", CASES)
def test_vidcom2_keeps_what_vidcom2_compression_keeps(t, side, ratio):
    n = side * side
    x, fr = video(t, n, seed=t + side)
    ref, ks, sim = official_vidcom2(x, n, ratio)
    assert len(set(ks)) > 1  # the frame-uniqueness budgets are in play (one frame gets more)
    keep = vc.official_keep(x, fr, grid_coords(t, side), ratio)
    assert keep == len(ref)
    sel = run(x, fr, grid_coords(t, side), keep)
    assert sel.keep_idx.tolist() == ref
    torch.testing.assert_close(sel.scores, -sim.flatten())


def test_vidcom2_keeps_the_onevision_newline_outside_the_budget():
    """The official code compresses the frames, then appends the newline: ours == official + the newline."""
    t, side = 8, 14
    n = side * side
    x, fr = video(t, n, seed=7)
    nl = torch.randn(1, 64)
    ref, _, _ = official_vidcom2(x, n, 0.25)
    sel = run(torch.cat([x, nl]), torch.cat([fr, torch.tensor([t - 1])]), grid_coords(t, side, 1), len(ref) + 1)
    assert sel.keep_idx.tolist() == ref + [t * n]


def test_vidcom2_keeps_image_tokens_of_a_video_request():
    t, side = 8, 8
    n = side * side
    x, fr = video(t, n, seed=2)
    img = torch.randn(16, 64)
    ref, _, _ = official_vidcom2(x, n, 0.25)
    coords = torch.cat([torch.tensor([[0, i // 4, i % 4] for i in range(16)]), grid_coords(t, side)])
    sel = run(torch.cat([img, x]), torch.cat([torch.full((16,), -1), fr]), coords, len(ref) + 16)
    assert sel.keep_idx.tolist() == list(range(16)) + [i + 16 for i in ref]


# ---- broken on purpose: the comparison has the power to see a wrong axis or temperature -------------------

def test_a_broken_vidcom2_fails_the_comparison(monkeypatch):
    t, side = 16, 14
    n = side * side
    x, fr = video(t, n, seed=30)
    ref, _, _ = official_vidcom2(x, n, 0.25)
    coords = grid_coords(t, side)
    assert run(x, fr, coords, len(ref)).keep_idx.tolist() == ref
    assert run(x, fr, coords, len(ref), temperature=1.0).keep_idx.tolist() != ref  # wrong temperature

    def wrong_axis(x, sizes, alphas=vc.ALPHAS):  # the frame centre taken across frames (dim 0), not within
        frames = F.normalize(x.view(len(sizes), sizes[0], x.shape[-1]), dim=-1)
        v = vc.multi_gaussian(frames, frames.mean(dim=(0, 1), keepdim=True), alphas)
        f = vc.multi_gaussian(frames, frames.mean(dim=0, keepdim=True), alphas)
        return list(v), list(f)

    monkeypatch.setattr(vc, "gaussian_scores", wrong_axis)
    assert run(x, fr, coords, len(ref)).keep_idx.tolist() != ref
    monkeypatch.undo()
    monkeypatch.setattr(vc, "low_var_channels", lambda x, ratio=0.5: x[:, x.var(0).argsort(descending=True)
                                                                       [:int(x.shape[1] * ratio)]])
    assert run(x, fr, coords, len(ref)).keep_idx.tolist() != ref  # the high-variance channels


# ---- our budget mapping where keep is not an official total ------------------------------------------------

def test_any_keep_is_met_and_official_budgets_are_nested():
    t, side = 8, 14
    n = side * side
    x, fr = video(t, n, seed=11)
    coords = grid_coords(t, side)
    for keep in [1, 5, 8, 9, 100, 391, 392, 393, 700, n * t]:
        kept = run(x, fr, coords, keep).keep_idx.tolist()
        assert len(kept) == keep == len(set(kept))
    _, _, sim = official_vidcom2(x, n, 0.25)
    uniq = vc.vidcom2_scores(x, [n] * t)[1]
    budgets = [vc.frame_budgets(uniq, [n] * t, k) for k in range(t + 1, 600)]
    assert all(sum(b) == k for b, k in zip(budgets, range(t + 1, 600)))
    assert all(a <= b for lo, hi in zip(budgets, budgets[1:]) for a, b in zip(lo, hi))  # more never takes away
    top = sorted(range(t), key=lambda f: -float(uniq[f]))[:5]
    kept5 = run(x, fr, coords, 5).keep_idx
    assert sorted(set((kept5 // n).tolist())) == sorted(top)  # keep < T: one token in each most unique frame
    assert all(int(sim[f].argmin()) == int(i) % n for f, i in zip(sorted(top), kept5))
    assert vc.frame_budgets(uniq, [n] * t, n * t) == [n] * t


def test_image_request_treats_each_item_as_a_frame():
    coords = torch.cat([grid_coords(1, 8), grid_coords(1, 8) + torch.tensor([1, 0, 0])])
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(0))
    sel = get_pruner("vidcom2").select(StageInput(tokens=x, keep=32, coords=coords))
    ref, _, _ = official_vidcom2(x, 64, 0.25)
    assert len(ref) == 32 and sel.keep_idx.tolist() == ref


# ---- through the engine: the features recomputed with the plain model ---------------------------------------

def test_vidcom2_through_the_engine_llava(engine_for, tiny_path):
    """Tiny LLaVA video (8 frames x 8x8): the projected features of the tower's feature layer, CLS dropped."""
    from transformers import AutoModelForImageTextToText

    engine = engine_for("llava")
    frames = [noise_image(50 + i) for i in range(8)]
    pv = engine.prepare(QUESTION, video=frames)["pixel_values"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_path("llava")).eval()
    with torch.no_grad():
        hidden = model.model.vision_tower(pv, output_hidden_states=True).hidden_states
        feats = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])
    assert feats.shape[:2] == (8, 64)
    for ratio in (0.25, 0.1):
        ref, ks, sim = official_vidcom2(feats.flatten(0, 1), 64, ratio)
        assert len(set(ks)) > 1  # one frame's budget raised by its uniqueness
        res = engine.generate(QUESTION, video=frames, plan=f"vidcom2:keep={len(ref)}", max_new_tokens=1)
        assert res.kept[0].tolist() == ref
    torch.testing.assert_close(res.scores[0].float(), -sim.flatten(), atol=1e-5, rtol=1e-5)


def test_vidcom2_through_the_engine_onevision(engine_for, tiny_path):
    """Tiny LLaVA-OneVision native video: 8 frames of 2x2 pooled tokens, then the newline (kept)."""
    from transformers import AutoModelForImageTextToText

    engine = engine_for("llava_onevision")
    frames = [noise_image(60 + i) for i in range(8)]
    pv = engine.prepare(QUESTION, video=frames)["pixel_values_videos"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_path("llava_onevision")).eval()
    cfg = model.config
    with torch.no_grad():
        out = model.model.get_video_features(pv, vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = out.pooler_output[0]
    assert feats.shape[0] == 8 * 4 + 1
    for ratio in (0.25, 0.5):
        ref, _, _ = official_vidcom2(feats[:32], 4, ratio)
        res = engine.generate(QUESTION, video=frames, plan=f"vidcom2:keep={len(ref) + 1}", max_new_tokens=1)
        assert res.kept[0].tolist() == ref + [32]

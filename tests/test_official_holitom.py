"""HoliTom (outer stage) against a reference written here from its official code path (our own transcription,
not a copy): cokeshao/HoliTom ``holitom/llava_arch.py``, ``LlavaMetaForCausalLM_holitom``:
``prepare_inputs_labels_for_multimodal`` (video branch: feature_sim, the ratio raised for the saved tokens),
``select_static_windows``, ``get_static_dynamic_features``, ``holitom`` (the "one_token" layout of
LLaVA-OneVision), ``merge_tokens_by_attention_density``, ``merge_tokens_by_density``, ``cluster_dpc_knn`` (its
rand * 1e-6 jitter left out: ties to the lower index) and ``merge_tokens_by_clustering`` (the BETA branch). Kept sets compared exactly and
merged features within 1e-5 at LLaVA-OneVision's geometry (8-32 frames of 14x14 = 196) at 25 % and 10 % and at
the tiny models' geometry; then through the engine on the shipped tiny models.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import noise_image
from tokensieve.pruners import StageInput, get_pruner
from tokensieve.pruners import holitom as ht

QUESTION = "what appeared first"


# ---- the transcription ---------------------------------------------------------------------------------------

def o_cluster_dpc_knn(x, cluster_num, k=7):
    batch_size, seq_len, embed_dim = x.shape
    dist_matrix = torch.cdist(x.float(), x.float()) / (embed_dim ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1).values[:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    # the official breaks ties by the rand * 1e-6 jitter on the density (left out); exact ties happen (K = 1, or
    # several tokens at cdist's exact 0 self-distance): the lower index first, as ours does
    index_center = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :cluster_num]
    return index_center, dist_matrix


def o_select_static_windows(feature_sim, batch_size, tau, max_window_size):
    similarity_matrix = torch.ones((batch_size, batch_size, feature_sim.shape[1]))
    for start in range(batch_size - 1):
        cum_similarity = torch.cumprod(feature_sim[start:] > tau, dim=0)
        similarity_matrix[start, start + 1:start + 1 + len(cum_similarity)] = cum_similarity
    window_lengths = (torch.arange(batch_size).unsqueeze(0) - torch.arange(batch_size).unsqueeze(1)).clamp(min=0)
    pruned_static_count = (similarity_matrix.sum(dim=-1) * window_lengths).float()
    dp = torch.zeros(batch_size)
    prev = torch.zeros(batch_size, dtype=torch.long)
    for i in range(batch_size):
        max_val = dp[i - 1] if i > 0 else 0
        best_j = i
        for window_size in range(2, min(i + 1, max_window_size) + 1):
            j = i - window_size
            current_val = (dp[j] if j >= 0 else 0) + pruned_static_count[j + 1, i]
            if current_val > max_val:
                max_val = current_val
                best_j = j + 1
        dp[i] = max_val
        prev[i] = best_j
    selected, i = [], batch_size - 1
    while i >= 0:
        selected.append((prev[i].item(), i))
        i = prev[i].item() - 1
    return selected[::-1], dp[-1].item()


def o_merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, beta):
    batch_size, seq_len, _ = feat.shape
    all_indices = torch.arange(seq_len).unsqueeze(0).expand(batch_size, -1)
    non_target_indices = torch.zeros((batch_size, seq_len - cluster_num), dtype=torch.long)
    for b in range(batch_size):
        non_target_indices[b] = all_indices[b][~torch.isin(all_indices[b], target_indices[b])]
    non_target_feat = torch.gather(feat, 1, non_target_indices.unsqueeze(-1).expand(-1, -1, feat.size(-1)))
    dist_matrix = torch.gather(dist_matrix, 1, non_target_indices.unsqueeze(-1).expand(-1, -1, dist_matrix.size(-1)))
    dist_matrix = torch.gather(dist_matrix, 2, target_indices.unsqueeze(1).expand(-1, dist_matrix.size(1), -1))
    idx_cluster = torch.argmin(dist_matrix, dim=-1)
    out = []
    for b in range(batch_size):
        tokens = []
        for i in range(cluster_num):
            mask = idx_cluster[b] == i
            if mask.any():
                tokens.append(beta * feat[b][target_indices[b][i]] + (1 - beta) * non_target_feat[b][mask].mean(dim=0))
            else:
                tokens.append(feat[b][target_indices[b][i]])
        out.append(torch.stack(tokens))
    return torch.stack(out)


def o_merge_tokens_by_attention_density(feat, attn, pos, retain_ratio, D, beta, K):
    batch_size, seq_len, embed_dim = feat.shape
    dominant_num = round(math.ceil(seq_len * retain_ratio) * (1 - D))
    contextual_num = math.ceil(seq_len * retain_ratio) - dominant_num
    if dominant_num > 0:
        all_indices = attn.topk(dominant_num, dim=1).indices
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
        dominant_tokens = feat.masked_select(~mask.unsqueeze(-1)).view(batch_size, dominant_num, embed_dim)
        dominant_pos = pos.masked_select(~mask).view(batch_size, dominant_num)
    else:
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool)
        dominant_tokens = torch.empty((batch_size, 0, embed_dim))
        dominant_pos = torch.empty((batch_size, 0), dtype=torch.long)
    if contextual_num > 0:
        feat_filtered = feat.masked_select(mask.unsqueeze(-1)).view(batch_size, seq_len - dominant_num, embed_dim)
        contextual_pos = pos.masked_select(mask).view(batch_size, seq_len - dominant_num)
        target_indices, dist_matrix = o_cluster_dpc_knn(feat_filtered, contextual_num, k=min(K, contextual_num))
        target_indices = torch.sort(target_indices, dim=-1)[0]
        contextual_pos = torch.stack([contextual_pos[b][target_indices[b]] for b in range(batch_size)])
        contextual_tokens = o_merge_tokens_by_clustering(feat_filtered, target_indices, dist_matrix, contextual_num,
                                                         beta)
    else:
        contextual_tokens = torch.empty((batch_size, 0, embed_dim))
        contextual_pos = torch.empty((batch_size, 0), dtype=torch.long)
    return torch.cat([dominant_tokens, contextual_tokens], 1), torch.cat([dominant_pos, contextual_pos], 1)


def o_merge_tokens_by_density(feat, pos, retain_ratio, beta, K):
    batch_size, seq_len, embed_dim = feat.shape
    cluster_num = round(seq_len * retain_ratio)
    if cluster_num > 0:
        target_indices, dist_matrix = o_cluster_dpc_knn(feat, cluster_num, k=min(K, cluster_num))
        target_indices = torch.sort(target_indices, dim=-1)[0]
        image_pos = torch.stack([pos[b][target_indices[b]] for b in range(batch_size)])
        return o_merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, beta), image_pos
    return torch.empty((batch_size, 0, embed_dim)), torch.empty((batch_size, 0), dtype=torch.long)


def official_holitom(pooled, attn, retain_ratio=0.25, tau=0.8, beta=0.6, D=0.0, K=7, max_window_size=1024):
    """The video branch on pooled [T, n, D] projected frame features and attn [T, n] (received attention,
    pooled) -> (global index frame * n + position of every token it returns, in its order; their features [k, D];
    the windows)."""
    batch_size, seq_len, _ = pooled.shape
    normed = F.normalize(pooled, p=2, dim=-1)
    feature_sim = F.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    selected_frames, total_reduced = o_select_static_windows(feature_sim, batch_size, tau, max_window_size)
    total_tokens = batch_size * seq_len
    retain_ratio = min(retain_ratio / ((total_tokens - total_reduced) / total_tokens), 1)
    index, feats = [], []
    for start, end in selected_frames:  # get_static_dynamic_features, then holitom (one_token: static first)
        all_indices = torch.arange(seq_len).unsqueeze(0)
        if start == end:
            dyn, dyn_pos = o_merge_tokens_by_attention_density(pooled[start:end + 1], attn[start:end + 1],
                                                               all_indices, retain_ratio, D, beta, K)
        else:
            mask = torch.all(feature_sim[start:end, :] > tau, dim=0)
            static_feat = pooled[start:end + 1, mask].mean(dim=0)
            dyn_pos = all_indices[:, ~mask].expand(end - start + 1, -1)
            dyn, dyn_pos = o_merge_tokens_by_attention_density(pooled[start:end + 1, ~mask], attn[start:end + 1, ~mask],
                                                               dyn_pos, retain_ratio, D, beta, K)
            st, st_pos = o_merge_tokens_by_density(static_feat.unsqueeze(0), all_indices[:, mask], retain_ratio, beta, K)
            index += (start * seq_len + st_pos[0]).tolist()
            feats.append(st[0])
        for f in range(dyn.shape[0]):
            index += ((start + f) * seq_len + dyn_pos[f]).tolist()
            feats.append(dyn[f])
    return index, torch.cat(feats), selected_frames


# ---- fixed signals -------------------------------------------------------------------------------------------

def video(t, n, d=64, seed=0, static=0.5):
    """[t, n, d] frames: a share ``static`` of the positions barely move (some scenes cut: every 5th frame a new
    scene, and frame 4 of each 5 stands alone), the rest move; attn [t, n] positive received attention."""
    g = torch.Generator().manual_seed(seed)
    still = torch.rand(n, generator=g) < static
    x = [torch.randn(n, d, generator=g)]
    for i in range(t - 1):
        if i % 5 in (3, 4):
            x.append(torch.randn(n, d, generator=g))
            continue
        step = torch.where(still[:, None], 0.05, 1.0)
        x.append(x[-1] + step * torch.randn(n, d, generator=g))
    attn = torch.rand(t, n, generator=g).softmax(-1)
    return torch.stack(x), attn


def layout(t, side, extra_last=0):
    """frames [t*n (+extra)], coords [.., 3] (frame, row, col), extras after the last frame's grid at col side."""
    rows = [[f, i // side, i % side] for f in range(t) for i in range(side * side)]
    rows += [[t - 1, side - 1, side + e] for e in range(extra_last)]
    coords = torch.tensor(rows)
    return coords[:, 0].clone(), coords


def run(x, attn, frames, coords, keep, **options):
    inp = StageInput(tokens=x, keep=keep, coords=coords, frames=frames, tower_score=attn, options=options)
    return get_pruner("holitom").select(inp)


OFFICIAL_NAMES = {"d": "D", "knn": "K", "beta": "beta"}  # our option -> the official env name (lower-cased)


def check(x, attn, ratio, tau=0.8, **options):
    """Ours at official_keep against the transcription: the same kept set, the same features (1e-5)."""
    t, n, _ = x.shape
    frames, coords = layout(t, int(n ** 0.5))
    ref, ref_feats, windows = official_holitom(x, attn, ratio, tau, **{OFFICIAL_NAMES[k]: v for k, v in options.items()})
    keep = ht.official_keep(x.flatten(0, 1), frames, coords, ratio, tau)
    assert keep == len(ref) == len(set(ref))
    sel = run(x.flatten(0, 1), attn.flatten(), frames, coords, keep, tau=tau, **options)
    assert sel.keep_idx.tolist() == sorted(ref)
    order = torch.tensor(ref).argsort()
    torch.testing.assert_close(sel.tokens, ref_feats[order], atol=1e-5, rtol=1e-5)
    return windows, sel


CASES = [(8, 14, 0.25, 0.8), (8, 14, 0.10, 0.65), (16, 14, 0.25, 0.8), (32, 14, 0.25, 0.8), (32, 14, 0.10, 0.65),
         (24, 14, 0.15, 0.8), (8, 8, 0.25, 0.8), (8, 2, 0.5, 0.8), (16, 13, 0.10, 0.65)]


@pytest.mark.parametrize("t,side,ratio,tau", CASES)
def test_holitom_keeps_and_merges_what_the_official_video_branch_does(t, side, ratio, tau):
    x, attn = video(t, side * side, seed=t + side)
    windows, _ = check(x, attn, ratio, tau)
    if side > 2:
        assert any(e > s for s, e in windows) and any(e == s for s, e in windows)  # windows and lone frames


def test_holitom_contextual_tokens_match_with_d():
    """D > 0: each frame's non-dominant tokens merged into DPC-kNN centres (the official D option)."""
    x, attn = video(16, 196, seed=3)
    check(x, attn, 0.25, 0.8, d=0.4)
    check(x, attn, 0.10, 0.65, d=0.4, beta=0.3, knn=4)


def test_static_tokens_sit_at_the_first_frame_of_their_window():
    t, side = 8, 14
    n = side * side
    x, attn = video(t, n, seed=5)
    windows, sel = check(x, attn, 0.25)
    s, e = next(w for w in windows if w[1] > w[0])
    groups = sel.groups
    stat = [i for i in range(s * n, (s + 1) * n) if int(groups[i + n]) == int(groups[i]) >= 0
            and sel.keep_idx[groups[i]] // n == s] if e > s else []
    assert stat  # a static position's later copies join the token kept at the window's first frame
    kept = set(sel.keep_idx.tolist())
    assert all(i + n * f not in kept for i in stat for f in range(1, e - s + 1))


def test_holitom_keeps_the_onevision_newline_and_images_outside_the_budget():
    t, side = 8, 14
    n = side * side
    x, attn = video(t, n, seed=7)
    ref, _, _ = official_holitom(x, attn, 0.25)
    frames, coords = layout(t, side, 1)
    tokens = torch.cat([x.flatten(0, 1), torch.randn(1, 64)])
    sel = run(tokens, torch.cat([attn.flatten(), torch.zeros(1)]), frames, coords, len(ref) + 1)
    assert sel.keep_idx.tolist() == sorted(ref) + [t * n]
    img = torch.randn(16, 64)
    icoords = torch.cat([torch.tensor([[0, i // 4, i % 4] for i in range(16)]), coords[:-1]])
    sel = run(torch.cat([img, x.flatten(0, 1)]), torch.cat([torch.zeros(16), attn.flatten()]),
              torch.cat([torch.full((16,), -1), frames[:-1]]), icoords, len(ref) + 16)
    assert sel.keep_idx.tolist() == list(range(16)) + [i + 16 for i in sorted(ref)]


def test_any_keep_is_met():
    t, side = 8, 14
    x, attn = video(t, side * side, seed=11)
    frames, coords = layout(t, side)
    counts = []
    for keep in [1, 7, 8, 9, 100, 391, 700, 1000, 1400, t * side * side]:
        sel = run(x.flatten(0, 1), attn.flatten(), frames, coords, keep)
        kept = sel.keep_idx.tolist()
        assert len(kept) == keep == len(set(kept)) == sel.tokens.shape[0]
        counts.append(int((sel.groups >= 0).sum()))
    assert counts[-1] == t * side * side


# ---- broken on purpose ---------------------------------------------------------------------------------------

def test_a_broken_holitom_fails_the_comparison(monkeypatch):
    t, side = 16, 14
    x, attn = video(t, side * side, seed=30)
    frames, coords = layout(t, side)
    ref, ref_feats, _ = official_holitom(x, attn, 0.25)
    keep = len(ref)
    flat, a = x.flatten(0, 1), attn.flatten()
    assert run(flat, a, frames, coords, keep).keep_idx.tolist() == sorted(ref)
    assert run(flat, -a, frames, coords, keep).keep_idx.tolist() != sorted(ref)  # least attended kept
    order = torch.tensor(ref).argsort()
    def within_frames(x, tau):  # the wrong axis: each token against its neighbour in the same frame
        xn = F.normalize(x.float(), dim=-1)
        return ((xn * xn.roll(1, dims=1)).sum(-1) > tau)[:-1]

    monkeypatch.setattr(ht, "static_over", within_frames)
    assert run(flat, a, frames, coords, keep).keep_idx.tolist() != sorted(ref)
    monkeypatch.undo()
    real = ht.cluster_merge
    monkeypatch.setattr(ht, "cluster_merge", lambda x, c, dist, beta=0.6: real(x, c, dist, 1 - beta))
    sel = run(flat, a, frames, coords, keep)
    assert sel.keep_idx.tolist() == sorted(ref)
    assert not torch.allclose(sel.tokens, ref_feats[order], atol=1e-5, rtol=1e-5)  # beta on the wrong side


# ---- through the engine: the signals recomputed with the plain model ----------------------------------------

def still_video(n_frames, seed=0, h=40, w=56):
    """Frames that share a still left part (the same pixels) and move on the right; a scene cut half way."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    out = []
    for i in range(n_frames):
        if i % (n_frames // 2) == 0:
            base = rng.rand(h, w, 3)
        frame = base.copy()
        frame[:, w // 2:] = rng.rand(h, w - w // 2, 3)
        out.append(Image.fromarray((frame * 255).astype("uint8")))
    return out


def received(attn):
    """[B, H, S, S] softmax attention -> [B, S]: what each token receives, mean over heads, then query rows
    (``attentions[-1].mean(dim=1).mean(dim=1)``)."""
    return attn.mean(dim=1).mean(dim=1)


def engine_check(engine, frames, feats, recv, ratio, tau, monkeypatch, extra=0):
    """The engine's holitom stage against official_holitom on the recomputed features and attention."""
    ref, ref_feats, windows = official_holitom(feats, recv, ratio, tau)
    caught = []
    real = ht.HoliTomPruner.select
    monkeypatch.setattr(ht.HoliTomPruner, "select", lambda self, inp: caught.append(real(self, inp)) or caught[-1])
    res = engine.generate(QUESTION, video=frames, plan=f"holitom:keep={len(ref) + extra},tau={tau}", max_new_tokens=1)
    monkeypatch.undo()
    n = feats.shape[0] * feats.shape[1]
    assert res.kept[0].tolist() == sorted(ref) + list(range(n, n + extra))
    torch.testing.assert_close(res.scores[0][:n].float(), recv.flatten(), atol=1e-5, rtol=1e-4)
    order = torch.tensor(ref).argsort()
    torch.testing.assert_close(caught[0].tokens[:len(ref)].float(), ref_feats[order], atol=1e-5, rtol=1e-4)
    return windows


def test_holitom_through_the_engine_llava(engine_for, tiny_path, monkeypatch):
    """Tiny LLaVA video (8 frames x 8x8, CLIP): the feature layer's projected patches and the attention the
    patches receive there (all query rows, CLS included), recomputed with the plain model's modules."""
    from transformers import AutoModelForImageTextToText

    from reference import clip_tower_attention

    engine = engine_for("llava")
    frames = still_video(8, seed=1)
    pv = engine.prepare(QUESTION, video=frames)["pixel_values"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_path("llava")).eval()
    layer = model.config.vision_feature_layer
    attn, hidden = clip_tower_attention(model.model.vision_tower, pv)
    with torch.no_grad():
        feats = model.model.multi_modal_projector(hidden[layer][:, 1:])
    recv = received(attn[len(hidden) - 1 + layer])[:, 1:]  # the layer whose output is hidden[layer]
    seen = []
    for ratio, tau in ((0.25, 0.8), (0.10, 0.65)):
        seen += engine_check(engine, frames, feats, recv, ratio, tau, monkeypatch)
    assert any(e > s for s, e in seen)  # static windows in play


def test_holitom_through_the_engine_onevision(engine_for, tiny_path, monkeypatch):
    """Tiny LLaVA-OneVision native video (SigLIP, no CLS): 8 frames pooled to 2x2, then the newline (kept);
    the received attention pooled to the frame grid like the features (``get_2dPool`` / ``apply_pooling``)."""
    from transformers import AutoModelForImageTextToText

    from reference import clip_tower_attention

    engine = engine_for("llava_onevision")
    frames = still_video(8, seed=2)
    pv = engine.prepare(QUESTION, video=frames)["pixel_values_videos"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_path("llava_onevision")).eval()
    cfg = model.config
    assert cfg.vision_feature_select_strategy == "full"  # SigLIP: every patch
    with torch.no_grad():
        out = model.model.get_video_features(pv, vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = out.pooler_output[0][:-1].view(8, 4, -1)
    tower = model.model.vision_tower
    attn, hidden = clip_tower_attention(getattr(tower, "vision_model", tower), pv.flatten(0, 1))
    layer = cfg.vision_feature_layer
    recv = received(attn[len(hidden) - 1 + layer])
    recv = model.model.apply_pooling(recv[..., None])[..., 0]
    seen = []
    for ratio, tau in ((0.25, 0.8), (0.5, 0.65)):
        seen += engine_check(engine, frames, feats, recv, ratio, tau, monkeypatch, extra=1)
    assert any(e > s for s, e in seen)  # static windows in play

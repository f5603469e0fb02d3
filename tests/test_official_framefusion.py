"""FrameFusion against a reference written here from its official code path (our own transcription, not a copy):
thu-nics/FrameFusion ``framefusion/main.py::FrameFusion`` (``forward``, ``compute_similarity_and_token_index_by_patch``,
``merge_tokens_and_get_mask``, ``_compute_pruning_ratio``, ``find_contigious_latter_index``), called as
``framefusion/models/qwen2/modeling_qwen2.py::Qwen2DecoderLayer_merge_then_prune_by_cost_forward`` calls it: once on
the input embeddings, then after each layer's attention with that attention's last-query row
(``framefusion/utils.py::scaled_dot_product_attention(num=1)``). The reference is driven call by call over a
whole sequence (text, frames, text) with ``patch_type = range(patch_num) * n_frames``; the pruner steps through
the same hidden states and rows (its step c = the official call c). Kept sets compared exactly and merged states
within 1e-5 at LLaVA-OneVision geometry (8-32 frames of 14x14 = 196 tokens) and the tiny models' (8 x 8x8,
8 x 2x2 + newline), then through the engine on the shipped tiny-llava and tiny-qwen2-vl with videos.
"""
import pytest
import torch

import tokensieve
from conftest import noise_image
from tokensieve.pruners import StageInput, get_pruner
from tokensieve.pruners import framefusion as ff

TEXT_TOKEN, IGNORE_TOKEN = -1, -2


# ---- the official code path, transcribed ----------------------------------------------------------------------

def official_cosine(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def official_run_ends(t):
    """find_contigious_latter_index: each run of ones -> 0s and the run's length at its last element."""
    prev = torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], 1)
    nxt = torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], 1)
    starts = torch.nonzero((t == 1) & (prev == 0), as_tuple=True)
    ends = torch.nonzero((t == 1) & (nxt == 0), as_tuple=True)
    out = torch.zeros_like(t)
    out[ends[0], ends[1]] = (ends[1] - starts[1] + 1).to(t.dtype)
    return out


def official_pruning_ratio(sparsity_list, cost, num_layers=28):
    s, total = 1, 0
    for r in sparsity_list:
        s *= 1 - r
        total += s
    remain = num_layers * cost - total
    if remain < 0:
        raise ValueError("The cost is too small")
    if remain / ((num_layers - len(sparsity_list)) * s) > 1:
        return 0
    return 1 - remain / ((num_layers - len(sparsity_list)) * s)


def official_similarity(hidden, patch_type, patch_num):
    type_by_patch, index_by_patch = torch.where(patch_type == torch.arange(patch_num)[:, None])
    type_by_patch, index_by_patch = type_by_patch[None], index_by_patch[None]
    sim = official_cosine(hidden[0, index_by_patch[:, :-1]], hidden[0, index_by_patch[:, 1:]])
    sim[type_by_patch[:, :-1] != type_by_patch[:, 1:]] = -2
    sim = torch.cat([torch.full((1, 1), IGNORE_TOKEN, dtype=hidden.dtype), sim], 1)
    return sim, index_by_patch


def official_merge(hidden, sim, index_by_patch, merge_index):
    if merge_index.shape[0] == 0:
        return hidden, torch.ones(hidden.shape[:-1], dtype=torch.bool)
    b = torch.arange(1)[:, None]
    mask_by_patch = torch.zeros(1, sim.shape[1], dtype=hidden.dtype)
    mask_by_patch[b, merge_index] = 1
    last = official_run_ends(mask_by_patch)
    keep_mask = torch.ones(hidden.shape[:-1], dtype=torch.bool)
    keep_mask[b, index_by_patch[b, merge_index]] = False
    nums = torch.sort(torch.unique(last.to(torch.long))).values
    nums = nums[1:] if nums[0] == 0 else nums
    num_idx, end_in_patch = torch.where(last == nums[:, None])
    merge_nums = nums[num_idx]
    start_in_patch = end_in_patch - merge_nums
    member_start = torch.repeat_interleave(start_in_patch, merge_nums)
    seq = torch.arange(1, int(merge_nums.sum()) + 1)
    starts = torch.cat((torch.tensor([0]), torch.cumsum(merge_nums, 0)[:-1]))
    member_in_patch = member_start + seq - torch.repeat_interleave(starts, merge_nums)
    hidden.index_add_(1, index_by_patch[0, member_start], hidden[b, index_by_patch[b, member_in_patch]])
    hidden[b, index_by_patch[b, start_in_patch]] /= merge_nums[None, :, None] + 1
    return hidden, keep_mask


class OfficialFrameFusion:
    """FrameFusion (cost, similarity_lower_bound, ratio_lower_bound) after ``prepare``; ``forward`` on hidden
    [1, S, D], ``pos`` [1, S] (the slots' original indices, carried as its 2-D position embeddings) and the
    layer's last-query row [1, H, 1, S] -> (hidden, pos)."""

    def __init__(self, patch_type, patch_num, start, length, cost=0.3, sim_bound=0.6, ratio_bound=0.1, layers=28):
        self.cost, self.sim_bound, self.ratio_bound, self.layers = cost, sim_bound, ratio_bound, layers
        self.patch_type, self.patch_num, self.start, self.length = patch_type, patch_num, start, length
        self.original_length = patch_type.shape[1]
        self.finish_merging = self.finish_pruning = False
        self.sparsity_list = []

    def forward(self, hidden, pos, attn=None):
        q_len, d = hidden.shape[1], hidden.shape[2]
        if q_len > 1 and self.finish_merging and not self.finish_pruning:
            length = self.length - (self.original_length - q_len)
            avg = attn.mean(dim=(1, 2))[0][self.start:self.start + length]
            ratio = official_pruning_ratio(self.sparsity_list, self.cost, self.layers)
            top = avg.topk(round(length * (1 - ratio))).indices + self.start
            keep = torch.cat((torch.arange(self.start), top, torch.arange(self.start + length, q_len))).sort().values
            hidden, pos = hidden[:, keep], pos[:, keep]
            self.finish_pruning = True
        if q_len > 1 and not self.finish_merging:
            upper = official_pruning_ratio(self.sparsity_list, self.cost, self.layers)
            sim, index_by_patch = official_similarity(hidden, self.patch_type, self.patch_num)
            n_frame_tokens = int((self.patch_type != TEXT_TOKEN).sum())
            merge_index = torch.where(sim >= self.sim_bound)[1]
            above = merge_index.shape[0] / n_frame_tokens
            if above < upper:
                self.sparsity_list.append(above)
                if above < self.ratio_bound:
                    self.finish_merging = True
            else:
                _, top = torch.topk(sim, int(upper * n_frame_tokens))
                merge_index = torch.sort(top).values[0]
                self.finish_merging = self.finish_pruning = True
            hidden, mask = official_merge(hidden, sim, index_by_patch, merge_index)
            self.patch_type = self.patch_type[mask].reshape(1, -1)
            hidden = hidden[mask, :].reshape(1, -1, d)
            pos = pos[:, mask[0]]
        return hidden, pos


# ---- fixed signals: a sequence, the layers in between, the rows ------------------------------------------------

def video(t, side, d=64, seed=0, extra=0, walk=False):
    """[t * side^2 (+extra), d] frame-major tokens: each position moves from frame to frame at its own rate a
    (x_t = sqrt(1 - a^2) x_{t-1} + a noise: cosine ~ sqrt(1 - a^2), a in [0.65, 1], so about 40 % stay above 0.6);
    ``walk``: a random walk instead (x_t = x_{t-1} + a noise: ever more alike); ``extra`` tokens after the last
    frame (OneVision's newline)."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    a = 0.65 + 0.35 * torch.rand(n, 1, generator=g)
    x = [torch.randn(n, d, generator=g)]
    for _ in range(t - 1):
        x.append((1 if walk else (1 - a ** 2).sqrt()) * x[-1] + a * torch.randn(n, d, generator=g))
    return torch.cat(x + [torch.randn(extra, d, generator=g)])


def layout(t, side, extra=0):
    """coords [N, 3] (frame, row, col) and frames [N] of the video tokens; extras at (t-1, side-1, side + e)."""
    rows = [[f, i // side, i % side] for f in range(t) for i in range(side * side)]
    rows += [[t - 1, side - 1, side + e] for e in range(extra)]
    coords = torch.tensor(rows)
    return coords, coords[:, 0].clone()


class Signals:
    """What the layers do between calls, keyed by original index so both sides see the same: call c > 0 adds
    c * drift (a shared direction: deeper states grow alike) and noise to every state; the row of call c is the
    softmax over the current sequence of fixed logits."""

    def __init__(self, s_total, d, heads=4, calls=12, seed=1, drift=0.35, noise=0.05):
        g = torch.Generator().manual_seed(seed)
        self.u = torch.randn(d, generator=g)
        self.noise = noise * torch.randn(calls, s_total, d, generator=g)
        self.logits = 3 * torch.randn(calls, heads, s_total, generator=g)
        self.drift = drift

    def layer(self, c, h, orig):
        return h if c == 0 else h + self.drift * self.u + self.noise[c, orig]

    def row(self, c, orig):
        return torch.softmax(self.logits[c][:, orig], -1)  # [H, S]


def run_official(x, prefix, suffix, patch_num, sig, calls, **kw):
    """Drive the reference call by call on [prefix text, x, suffix text]; -> per call (pos, hidden) after it."""
    g = torch.Generator().manual_seed(9)
    d = x.shape[1]
    hidden = torch.cat([torch.randn(prefix, d, generator=g), x, torch.randn(suffix, d, generator=g)])[None]
    n = x.shape[0]
    n_frames, extra = n // patch_num, n % patch_num
    # the extras (OneVision's newline after the last frame) are positions of their own, as LLaVA-Video's
    # per-row newlines are in the official patch_num = 14 x 15
    patch_type = torch.tensor([[TEXT_TOKEN] * prefix + list(range(patch_num)) * n_frames
                               + list(range(patch_num, patch_num + extra)) + [TEXT_TOKEN] * suffix])
    model = OfficialFrameFusion(patch_type, patch_num + extra, prefix, n, **kw)
    pos = torch.arange(hidden.shape[1])[None]
    out = []
    for c in range(calls):
        h = sig.layer(c, hidden[0], pos[0])[None]
        attn = None if c == 0 else sig.row(c, pos[0])[None, :, None]
        hidden, pos = model.forward(h.clone(), pos, attn)
        out.append((pos[0].clone(), hidden[0].clone()))
        if model.finish_pruning:
            break
    return out, model


def run_ours(x, coords, frames, prefix, suffix, sig, last, keep=None, layers=28, **options):
    """The pruner stepping through calls 0..last on the video tokens; -> per step (original slots, tokens)."""
    n = x.shape[0]
    orig = torch.arange(prefix, prefix + n)
    text = (torch.arange(prefix), torch.arange(prefix + n, prefix + n + suffix))
    tokens, carry, out = x, None, []
    pruner = get_pruner("framefusion")
    for c in range(last + 1):
        tokens = sig.layer(c, tokens, orig)
        attn = None if c == 0 else sig.row(c, torch.cat([text[0], orig, text[1]]))[:, prefix:prefix + orig.numel()]
        sel = pruner.select(StageInput(tokens=tokens, keep=keep, coords=coords[orig - prefix], attn=attn,
                                       options=options, frames=frames[orig - prefix], layers_left=last - c,
                                       carry=carry, llm_layers=layers))
        carry = sel.carry
        tokens = tokens[sel.keep_idx] if sel.tokens is None else sel.tokens
        orig = orig[sel.keep_idx]
        out.append((orig.clone(), tokens.clone()))
    return out, carry


def compare(t, side, seed, extra=0, cost=0.3, layers=28, prefix=10, suffix=6, drift=0.2, walk=False):
    x = video(t, side, seed=seed, extra=extra, walk=walk)
    coords, frames = layout(t, side, extra)
    sig = Signals(prefix + x.shape[0] + suffix, x.shape[1], seed=seed + 1, drift=drift)
    ref, model = run_official(x, prefix, suffix, side * side, sig, 12, cost=cost, layers=layers)
    ours, hist = run_ours(x, coords, frames, prefix, suffix, sig, last=11, cost=cost, layers=layers)
    assert model.finish_pruning and len(ref) < 12  # the official finished before our last step
    for c, (pos, hidden) in enumerate(ref):
        vis = (pos >= prefix) & (pos < prefix + x.shape[0])
        assert ours[c][0].tolist() == pos[vis].tolist(), f"call {c}"
        torch.testing.assert_close(ours[c][1], hidden[vis], atol=1e-5, rtol=1e-5)
    assert ours[-1][0].tolist() == ours[len(ref) - 1][0].tolist()  # then nothing more
    assert hist.shares == pytest.approx(model.sparsity_list, abs=0)
    return ref, model


@pytest.mark.parametrize("t,seed", [(8, 0), (16, 0), (32, 0), (24, 5)])
def test_framefusion_merges_then_prunes_as_the_official_onevision_geometry(t, seed):
    ref, model = compare(t, 14, seed)
    shares = model.sparsity_list
    assert len(shares) == 2 and shares[0] > 0.3 and shares[1] < 0.1  # two merge calls, the second below 0.1
    assert len(ref) == 3 and ref[2][0].numel() < ref[1][0].numel()  # then the prune at the next call


@pytest.mark.parametrize("t,drift", [(16, 0.35), (32, 0.35), (8, 0.6), (32, 0.6)])
def test_framefusion_capped_after_merge_calls_as_the_official(t, drift):
    """States growing alike layer by layer merge past the cost's share at a later call: the official merges the
    int(share * n) most similar there and stops (no prune)."""
    ref, model = compare(t, 14, 0, drift=drift)
    assert len(model.sparsity_list) >= 2 and len(ref) == len(model.sparsity_list) + 1


def test_framefusion_capped_at_the_first_call():
    ref, model = compare(8, 14, seed=3, walk=True)
    assert len(ref) == 1 and model.sparsity_list == [] and model.finish_pruning


@pytest.mark.parametrize("t,side,extra,layers,cost,calls", [(8, 8, 0, 4, 0.5, 3), (8, 8, 0, 4, 0.6, 1),
                                                             (8, 2, 1, 28, 0.3, 3), (8, 8, 0, 28, 0.3, 3)])
def test_framefusion_matches_the_official_calls_tiny_geometry(t, side, extra, layers, cost, calls):
    """The tiny models' videos: 8 frames of 8x8 (tiny-llava, a 4-layer LLM: its own depth, and the official 28),
    8 frames of 2x2 and OneVision's newline."""
    ref, _ = compare(t, side, seed=side + t, extra=extra, layers=layers, cost=cost)
    assert len(ref) == calls


# ---- broken on purpose: the comparison sees a wrong axis, a wrong representative, a wrong importance ----------

def test_a_broken_framefusion_fails_the_comparison(monkeypatch):
    compare(16, 14, 0)
    plain_merge, plain_prune = ff.merge_runs, ff.FrameFusionPruner._prune
    with monkeypatch.context() as m:  # the wrong axis: each token against the one before it in its frame
        m.setattr(ff, "position_order", lambda coords, members: members)
        with pytest.raises(AssertionError):
            compare(16, 14, 0)
    with monkeypatch.context() as m:  # a run kept as its first frame's state, not the mean
        m.setattr(ff, "merge_runs", lambda x, order, marked: (lambda r: (r[0], x.float().clone(), r[2]))(
            plain_merge(x, order, marked)))
        with pytest.raises(AssertionError):
            compare(16, 14, 0)

    def max_over_heads(self, inp, *args):
        inp.attn = inp.attn.max(0, keepdim=True).values.expand_as(inp.attn)
        return plain_prune(self, inp, *args)

    with monkeypatch.context() as m:  # the importance: the max over heads, not the mean
        m.setattr(ff.FrameFusionPruner, "_prune", max_over_heads)
        with pytest.raises(AssertionError):
            compare(16, 14, 0)


def test_framefusion_raises_where_the_official_cost_is_spent():
    """A 4-layer LLM at cost 0.3: two merge calls spend more than 4 x 0.3 layers; the official raises."""
    x = video(8, 8, seed=4)
    coords, frames = layout(8, 8)
    sig = Signals(16 + x.shape[0], x.shape[1], seed=5)
    with pytest.raises(ValueError, match="The cost is too small"):
        run_official(x, 10, 6, 64, sig, 12, cost=0.3, layers=4)
    with pytest.raises(ValueError, match="cost=0.3 is too small"):
        run_ours(x, coords, frames, 10, 6, sig, last=11, cost=0.3, layers=4)


# ---- through the engine: the whole prefill recomputed here with the plain model's modules ----------------------

QUESTION = "what is shown"


def clip_video(w, n=8):
    """Frames that change slowly: one image (weight w) with each frame's own noise blended in (no two alike)."""
    import numpy as np
    from PIL import Image
    base = np.asarray(noise_image(0), dtype=np.float32)
    return [Image.fromarray((w * base + (1 - w) * np.asarray(noise_image(i + 1), dtype=np.float32))
                            .astype("uint8")) for i in range(n)]


def eager_last_row(layer, hidden, cos, sin, rope):
    """[H, S] softmax row of the last token in ``layer`` (eager), hidden [1, S, D] its input."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    hd = attn.head_dim
    q = attn.q_proj(x).view(1, -1, x.shape[1], hd) if False else attn.q_proj(x).view(1, x.shape[1], -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, x.shape[1], -1, hd).transpose(1, 2)
    q, k = rope(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    return torch.softmax((q[:, :, -1:] @ k.transpose(-1, -2)) * attn.scaling, -1)[0, :, 0]


def reference_prefill(lm, embeds, cos, sin, vis_slots, patch_type, patch_num, rope, cost, sim_bound=0.6):
    """The official calls in the engine's placement (call c before decoder layer c, on layer c - 1's output, with
    layer c - 1's last-query row) over the plain decoder layers -> (kept slots, per call the visual states after
    it, the last layer's output [S', D])."""
    model = OfficialFrameFusion(patch_type, patch_num, int(vis_slots[0]), len(vis_slots), cost=cost,
                                sim_bound=sim_bound, layers=len(lm.layers))
    hidden, pos, states = embeds, torch.arange(embeds.shape[1])[None], []
    for c in range(len(lm.layers) + 1):
        if c > 0:
            layer = lm.layers[c - 1]
            cs, sn = cos[..., pos[0], :], sin[..., pos[0], :]
            row = eager_last_row(layer, hidden, cs, sn, rope) if not model.finish_pruning else None
            hidden = layer(hidden, attention_mask=None, position_embeddings=(cs, sn))
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        else:
            row = None
        if c < len(lm.layers) and not model.finish_pruning:
            hidden, pos = model.forward(hidden.clone(), pos, None if row is None else row[None, :, None])
            vis = torch.isin(pos[0], vis_slots)
            states.append((pos[0][vis], hidden[0][vis]))
    return pos[0], states, hidden[0]


def spy_steps(monkeypatch):
    """The merged states the pruner hands back at each step of the engine's run."""
    steps, plain = [], ff.FrameFusionPruner.select

    def spy(self, inp):
        sel = plain(self, inp)
        steps.append(inp.tokens[sel.keep_idx] if sel.tokens is None else sel.tokens)
        return sel

    monkeypatch.setattr(ff.FrameFusionPruner, "select", spy)
    return steps


LLAVA_CASES = [(0.6, 0.5, 0.95, 3), (0.3, 0.5, 0.9, 3), (0.6, 0.3, 0.97, 2), (0.8, 0.3, 0.6, 1)]


@pytest.mark.parametrize("w,cost,threshold,calls", LLAVA_CASES)
def test_framefusion_through_the_engine_tiny_llava(monkeypatch, w, cost, threshold, calls):
    """Shipped tiny-llava (a 4-layer Llama; video as 8 images of 8x8 tokens): merge, merge, prune; merge, prune;
    capped at the first call (its projected frames are alike: cosines 0.8-0.99, hence the thresholds)."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    path = tokensieve.shipped.path("tiny-llava")
    engine = tokensieve.load(path)
    frames = clip_video(w)
    inputs = engine.prepare(QUESTION, video=frames)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    ids = inputs["input_ids"]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.flatten(0, 1)
        embeds = model.get_input_embeddings()(ids)
        vis = ids[0] == model.config.image_token_id
        embeds[0, vis] = feats.to(embeds.dtype)
        lm = model.model.language_model
        cos, sin = lm.rotary_emb(embeds, torch.arange(ids.shape[1])[None])
        slots = vis.nonzero().flatten()
        patch_type = torch.full((1, ids.shape[1]), TEXT_TOKEN)
        patch_type[0, slots] = torch.arange(slots.numel()) % 64
        kept, states, last = reference_prefill(lm, embeds, cos, sin, slots, patch_type, 64, apply_rotary_pos_emb,
                                               cost, threshold)
        logits = model.lm_head(lm.norm(last[-1:]))[0]
    steps = spy_steps(monkeypatch)
    res = engine.generate(QUESTION, video=frames, plan=f"framefusion:cost={cost},threshold={threshold}", max_new_tokens=1,
                          output_logits=True)
    engine.close()
    for c, ((ref_pos, ref_h), ours) in enumerate(zip(states, steps)):
        assert ours.shape == ref_h.shape, f"step {c}"
        torch.testing.assert_close(ours, ref_h, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {c}: {m}")
    assert res.kept[0].tolist() == torch.searchsorted(slots, kept[torch.isin(kept, slots)]).tolist()
    assert len(states) == calls and res.kept[0].numel() < slots.numel()
    torch.testing.assert_close(res.logits[0], logits, atol=1e-4, rtol=1e-4)


def qwen_reference(path, inputs, cost, threshold):
    """Shipped tiny-qwen2-vl, plain modules: video features, 3-D rope positions, the reference prefill ->
    (visual slots, kept slots, per call states, first-token logits)."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    ids = inputs["input_ids"]
    with torch.no_grad():
        feats = torch.cat(model.model.get_video_features(inputs["pixel_values_videos"],
                                                         inputs["video_grid_thw"]).pooler_output)
        embeds = model.get_input_embeddings()(ids)
        vis = ids[0] == model.config.video_token_id
        embeds[0, vis] = feats.to(embeds.dtype)
        pos, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], None, inputs["video_grid_thw"],
                                            inputs["attention_mask"])
        lm = model.model.language_model
        cos, sin = lm.rotary_emb(embeds, pos)
        slots = vis.nonzero().flatten()
        per_frame = int(inputs["video_grid_thw"][0, 1:].prod()) // 4
        patch_type = torch.full((1, ids.shape[1]), TEXT_TOKEN)
        patch_type[0, slots] = torch.arange(slots.numel()) % per_frame
        kept, states, last = reference_prefill(lm, embeds, cos, sin, slots, patch_type, per_frame,
                                               apply_rotary_pos_emb, cost, threshold)
        return slots, kept, states, model.lm_head(lm.norm(last[-1:]))[0]


QWEN_CASES = [(0.6, 0.5, 0.95, 3), (0.3, 0.5, 0.9, 3), (0.0, 0.3, 0.9, 2), (0.8, 0.3, 0.6, 1)]


@pytest.mark.parametrize("w,cost,threshold,calls", QWEN_CASES)
def test_framefusion_through_the_engine_tiny_qwen2_vl(monkeypatch, w, cost, threshold, calls):
    """Shipped tiny-qwen2-vl, native video (16 frames: 8 temporal patches of a merged grid), M-RoPE positions."""
    path = tokensieve.shipped.path("tiny-qwen2-vl")
    engine = tokensieve.load(path)
    frames = clip_video(w, 16)
    slots, kept, states, logits = qwen_reference(path, engine.prepare(QUESTION, video=frames), cost, threshold)
    steps = spy_steps(monkeypatch)
    res = engine.generate(QUESTION, video=frames, plan=f"framefusion:cost={cost},threshold={threshold}",
                          max_new_tokens=1, output_logits=True)
    engine.close()
    for c, ((ref_pos, ref_h), ours) in enumerate(zip(states, steps)):
        assert ours.shape == ref_h.shape, f"step {c}"
        torch.testing.assert_close(ours, ref_h, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {c}: {m}")
    assert res.kept[0].tolist() == torch.searchsorted(slots, kept[torch.isin(kept, slots)]).tolist()
    assert len(states) == calls and res.kept[0].numel() < slots.numel()
    torch.testing.assert_close(res.logits[0], logits, atol=1e-4, rtol=1e-4)


# ---- the stage in a plan: steps, a token budget, the metering, the refusals ------------------------------------

def test_framefusion_steps_keep_and_metering(monkeypatch):
    """Its steps (before layers 0..K) each meter the tokens they leave; keep=K is met exactly; an LLM stage before
    it is refused (its steps start at layer 0)."""
    engine = tokensieve.load(tokensieve.shipped.path("tiny-qwen2-vl"))
    frames = clip_video(0.6, 16)
    steps = spy_steps(monkeypatch)
    res = engine.generate(QUESTION, video=frames, plan="framefusion:cost=0.5,threshold=0.95", max_new_tokens=1)
    text = res.stats["per_layer_kv_len"][0] - steps[0].shape[0]
    assert res.stats["per_layer_kv_len"] == [text + s.shape[0] for s in steps]  # 484, 439, 98, 98 visual
    assert len({s.shape[0] for s in steps}) == 3
    res = engine.generate(QUESTION, video=frames, plan="framefusion:layer=2,keep=0.25,threshold=0.95;"
                                                       "fastv:layer=3,keep=0.5", max_new_tokens=1)
    assert [k.numel() for k in res.kept] == [140, 70]
    with pytest.raises(tokensieve.PlanError, match="must be the plan's first LLM stage"):
        engine.generate(QUESTION, video=frames, plan="fastv:layer=1,keep=0.5;framefusion:layer=2")
    engine.close()

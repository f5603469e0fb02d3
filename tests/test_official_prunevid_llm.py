"""PruneVid's LLM stage (question-guided selection) against a reference written here from its official code
path (our own transcription, not a copy): Visual-AI/PruneVid ``models/pllava/elastic_cache.py``
(``VTPWindowCache.process_attention`` / ``prompt_prefill``) on the attention ``models/pllava/llama.py``
computes without RoPE or causal mask (``attn_weights_wo_pos``) at ``selected_layer``; alpha = 0.4. On fixed rows
in the merge stage's official order, then through the engine after the merge stage, the rows recomputed here
from the hidden states entering the layer.
"""
import pytest
import torch

from test_official_prunevid import QUESTION, _caught, official_prunevid, scene_frames
from tokensieve.pruners import StageInput, get_pruner


# ---- the LLM stage: question-guided selection ---------------------------------------------------------------

def official_process_attention(text_to_image, static_sizes, dynamic_sizes, window_sizes, alpha=0.4):
    """VTPWindowCache.process_attention (elastic_cache.py) on text_to_image [1, H, T, N] in the merge's output
    order -> the kept indices, sorted (prompt_prefill sorts them)."""
    att = text_to_image[0].max(dim=0)[0].max(dim=0)[0]
    start, out = 0, []
    for s_size, d_size, w in zip(static_sizes, dynamic_sizes, window_sizes):
        end = start + s_size + d_size
        win = att[start:end]
        _, top = torch.topk(win[:s_size], k=int(s_size * alpha), dim=-1)
        out.append(top + start)
        dyn = win[s_size:].view(w, -1)
        _, top = torch.topk(dyn, k=int(dyn.shape[-1] * alpha), dim=-1)
        top = top + start + s_size
        out.append(torch.cat([top[i] + dyn.shape[-1] * i for i in range(w)]))
        start = end
    return torch.cat(out).sort().values


def official_layout(windows, static_sizes, per_frame):
    """spans [M, 2] and coords [M, 3] of the merge's output in the official order."""
    spans, a = [], 0
    for w, s in zip(windows, static_sizes):
        spans += [[a, a + w - 1]] * s + [[f, f] for f in range(a, a + w) for _ in range(per_frame)]
        a += w
    spans = torch.tensor(spans)
    return spans, torch.stack([spans[:, 0], torch.zeros(len(spans), dtype=torch.long), torch.arange(len(spans))], 1)


@pytest.mark.parametrize("windows,static_sizes,per_frame", [([3, 5], [36, 40], 49), ([2, 4, 2], [10, 0, 7], 3)])
def test_llm_selection_keeps_what_process_attention_keeps(windows, static_sizes, per_frame):
    spans, coords = official_layout(windows, static_sizes, per_frame)
    att = torch.softmax(torch.randn(1, 4, 6, spans.shape[0], generator=torch.Generator().manual_seed(1)), -1)
    ref = official_process_attention(att, static_sizes, [w * per_frame for w in windows], windows)
    sel = get_pruner("prunevid").select(StageInput(tokens=torch.randn(spans.shape[0], 8), keep=None, coords=coords,
                                                   text_attn=att[0], spans=spans))
    assert sel.keep_idx.tolist() == ref.tolist()
    sel = get_pruner("prunevid").select(StageInput(tokens=torch.randn(spans.shape[0], 8), keep=ref.numel(),
                                                   coords=coords, text_attn=att[0], spans=spans))
    assert sel.keep_idx.tolist() == ref.tolist()  # the official total as a numeric keep
    wrong = get_pruner("prunevid").select(StageInput(tokens=torch.randn(spans.shape[0], 8), keep=None, coords=coords,
                                                     text_attn=att[0].mean(0, keepdim=True), spans=spans))
    assert wrong.keep_idx.tolist() != ref.tolist()  # broken on purpose: heads averaged, not maxed


def _layer_input(engine, layer, caught):
    """Capture the hidden states entering LLM decoder layer ``layer`` during the engine's prefill."""
    layers = engine.model.model.language_model.layers
    return layers[layer].register_forward_pre_hook(
        lambda m, args, kwargs: caught.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        if len(caught) == 0 else None, with_kwargs=True)


@pytest.mark.parametrize("family,scenes", [("llava", (3, 5)), ("qwen2_vl", (6, 10))])
def test_llm_selection_through_the_engine(engine_for, monkeypatch, family, scenes):
    """Merge, then select at layer 2: the rows recomputed here from the hidden states entering layer 1 (RoPE-free
    q / k of its attention, softmax over every key), the kept set against process_attention in the official order."""
    engine = engine_for(family)
    caught, hidden = _caught(monkeypatch), []
    hook = _layer_input(engine, 1, hidden)
    try:
        engine.generate(QUESTION, video=scene_frames(scenes, seed=50 if family == "llava" else 80),
                        plan="prunevid:keep=auto;prunevid:where=llm,layer=2,keep=auto", max_new_tokens=1)
    finally:
        hook.remove()
    (merge_in, merge_sel), (llm_in, llm_sel) = caught[:2]
    t = int(merge_in.frames.max()) + 1
    _, where, windows, static_sizes = official_prunevid(merge_in.tokens.float(), t)
    assert where.sort().values.tolist() == merge_sel.keep_idx.tolist()
    attn_mod = engine.model.model.language_model.layers[1].self_attn
    x = engine.model.model.language_model.layers[1].input_layernorm(hidden[0])[0].float()
    hd = attn_mod.head_dim
    q = attn_mod.q_proj.float()(x).view(x.shape[0], -1, hd).transpose(0, 1)
    k = attn_mod.k_proj.float()(x).view(x.shape[0], -1, hd).transpose(0, 1)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn_mod.scaling, -1)  # [H, S, S], no mask, no RoPE
    n_vis = merge_sel.keep_idx.numel()
    ids = engine.prepare(QUESTION, video=scene_frames(scenes, seed=50 if family == "llava" else 80))["input_ids"][0]
    vis_tok = engine.model.config.video_token_id if family == "qwen2_vl" else engine.model.config.image_token_id
    first = int((ids == vis_tok).nonzero()[0])
    cols = torch.arange(first, first + n_vis)
    rows = torch.arange(first + n_vis, probs.shape[1])
    text_to_image = probs[:, rows][:, :, cols]
    torch.testing.assert_close(llm_in.text_attn.float(), text_to_image, atol=1e-5, rtol=1e-4)
    rank = torch.searchsorted(merge_sel.keep_idx.cpu(), where)  # official order -> the stage's order
    ref = official_process_attention(text_to_image[:, :, rank][None], static_sizes, official_prunevid.dynamic_sizes,
                                     windows)
    assert llm_sel.keep_idx.tolist() == rank[ref].sort().values.tolist()

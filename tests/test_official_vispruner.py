"""`vispruner` against a reference transcribed from the official code path, on fixed signals at LLaVA-1.5
geometry (24 x 24 = 576 patches) and the tiny models' (8 x 8 = 64), and through the engine on the tiny
LLaVA (eager CLS row and feature-layer hidden states computed here) so the recorded signals are checked too."""
import types

import pytest
import torch

from conftest import noise_image
from reference import clip_tower_attention
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, TowerRecord, get_pruner
from tokensieve.pruners import vispruner as vp


def official_vispruner(image_attentions, image_features, visual_token_num, important_ratio):
    """The official VisPruner token selection, line for line.

    Transcribed from Theia-4869/VisPruner, ``llava/model/llava_arch.py``, ``LlavaMetaForCausalLM.encode_images``
    (signals as ``llava/model/multimodal_encoder/clip_encoder.py``, ``CLIPVisionTower.feature_select`` gives
    them with ``select_feature="patch"``). image_attentions [B, H, N]: the CLS row of the feature layer's
    softmax attention over the patches (``attentions[-2][:, :, 0, 1:]``); image_features [B, N, C]: the feature
    layer's patch hidden states (``hidden_states[-2][:, 1:]``). Returns index_masks [B, N] bool.
    """
    B, N, _C = image_features.shape  # official: B, N, C
    device = image_features.device
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num

    image_attentions = image_attentions.mean(dim=1)  # (B, N)
    token_indices = image_attentions.argsort(dim=-1, descending=True)  # (B, N)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]

    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # (B, N, C)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break

        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores = scores.max(dim=-1).values

        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
            residual_indices[..., 1::2]
        ], dim=-1)

    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)
    else:
        selected_indices = important_indices
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, selected_indices, True)
    return index_masks


def official_kept(attn, feats, keep, ratio):
    """attn [H, 1+N] CLS row (CLS first), feats [N, C] patches -> the official kept patch indices, ascending."""
    mask = official_vispruner(attn[None, :, 1:], feats[None], keep, ratio)[0]
    return mask.nonzero().flatten().tolist()


def fixed_signals(side, seed, heads=4, dim=32):
    """CLS attention [H, 1+N] (softmax over CLS + patches), patch features [N, C] with uneven norms."""
    g = torch.Generator().manual_seed(seed)
    attn = torch.softmax(3 * torch.randn(heads, 1 + side * side, generator=g), -1)
    feats = torch.randn(side * side, dim, generator=g) * (0.1 + 3 * torch.rand(side * side, 1, generator=g)) + 0.3
    return attn, feats


def ours(attn, feats, side, keep, **options):
    """The pruner on the patches, its score from its own ``tower_score`` on a one-tile record."""
    pruner = get_pruner("vispruner")
    rec = TowerRecord(prefix=1, cls={5: attn[None]})
    inp = StageInput(tokens=feats, keep=keep, coords=grid_coords(side, side), options=options,
                     tower_score=pruner.tower_score(rec, [5])[0])
    return pruner.select(inp)


CASES = [(24, 192, 0.5), (24, 128, 0.5), (24, 64, 0.5), (24, 64, 0.75), (24, 128, 0.25), (24, 64, 0.0),
         (24, 64, 1.0), (24, 16, 0.5), (8, 32, 0.5), (8, 16, 0.5), (8, 24, 0.5), (8, 16, 0.25)]


@pytest.mark.parametrize("side,keep,ratio", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_on_fixed_signals(side, keep, ratio, seed):
    attn, feats = fixed_signals(side, seed)
    sel = ours(attn, feats, side, keep, important_ratio=ratio)
    want = official_kept(attn, feats, keep, ratio)
    assert len(want) == keep and sel.keep_idx.tolist() == want
    torch.testing.assert_close(sel.scores, attn[:, 1:].mean(0))  # CLS attention, head mean


def test_default_ratio_is_the_official_half():
    attn, feats = fixed_signals(24, 7)
    assert ours(attn, feats, 24, 128).keep_idx.tolist() == official_kept(attn, feats, 128, 0.5)
    assert ours(attn, feats, 24, 128).keep_idx.tolist() != official_kept(attn, feats, 128, 0.75)


def test_diverse_tokens_are_not_the_next_by_attention():
    """The diverse half differs from plain top-k CLS (the method is more than ``cls``)."""
    attn, feats = fixed_signals(24, 0)
    top = torch.topk(attn[:, 1:].mean(0), 64).indices.sort().values.tolist()
    kept = ours(attn, feats, 24, 64).keep_idx.tolist()
    assert kept != top
    important = attn[:, 1:].mean(0).argsort(descending=True)[:32].tolist()
    assert set(important) <= set(kept)


def test_where_the_official_code_fails_we_keep_keep_tokens():
    """N - int(T r) odd (T = 66 of 576), or more removals due than A has (T = 16, r = 0.75 of 64: a round at
    R = 12 with 8 due): the official code raises; ours keeps T. T = 56, r = 0.85
    of 64 (R = 17 = 2 x 8 + 1): the official code runs but drops its last A token (55 kept); ours keeps it."""
    attn, feats = fixed_signals(24, 0)
    with pytest.raises((RuntimeError, IndexError)):
        official_kept(attn, feats, 66, 0.5)
    assert ours(attn, feats, 24, 66).keep_idx.numel() == 66
    attn, feats = fixed_signals(8, 0)
    with pytest.raises((RuntimeError, IndexError)):
        official_kept(attn, feats, 16, 0.75)
    assert ours(attn, feats, 8, 16, important_ratio=0.75).keep_idx.numel() == 16
    want = official_kept(attn, feats, 56, 0.85)
    kept = ours(attn, feats, 8, 56, important_ratio=0.85).keep_idx.tolist()
    assert len(want) == 55 and len(kept) == 56 and set(want) < set(kept)


@pytest.mark.parametrize("broken", ["normalise_wrong_axis", "round_of_16"])
def test_a_broken_method_fails_the_comparison(monkeypatch, broken):
    """The comparison can fail: features normalised over the token axis, or 16 removals a round, differ."""
    if broken == "normalise_wrong_axis":
        normalize = torch.nn.functional.normalize
        monkeypatch.setattr(vp, "F", types.SimpleNamespace(normalize=lambda x, dim: normalize(x, dim=0)))
    else:
        monkeypatch.setattr(vp, "ROUND", 16)
    attn, feats = fixed_signals(24, 0)
    assert ours(attn, feats, 24, 64).keep_idx.tolist() != official_kept(attn, feats, 64, 0.5)


# ---- through the engine on the tiny LLaVA ---------------------------------------------------------

def _eager_feature_layer(model, pixel_values, layer):
    """Of image 0 in CLIP layer ``layer``, computed here (``reference.clip_tower_attention``): the CLS attention
    row [H, S] (softmax of q.k) and the layer's output hidden states [S, D] (``hidden_states[layer + 1]``, the
    projector's input)."""
    attn, hidden = clip_tower_attention(model.model.vision_tower, pixel_values)
    return attn[layer][0, :, 0], hidden[layer + 1][0]


@pytest.mark.parametrize("keep,ratio", [(16, 0.5), (32, 0.5), (24, 0.25)])
def test_engine_matches_official_on_tiny_llava(engine_for, keep, ratio):
    """Kept set = the official one on the eager CLS row and feature-layer states; the LLM's visual embeddings
    are the projector of the kept feature-layer states (nothing merged)."""
    engine, img = engine_for("llava"), noise_image(5)
    inputs = engine.prepare("what", images=[img])
    cls_row, hidden = _eager_feature_layer(engine.model, inputs["pixel_values"], engine.adapter.feature_layer)
    want = official_kept(cls_row.float(), hidden[1:].float(), keep, ratio)
    seen = []
    hook = engine.adapter.llm_layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    try:
        res = engine.generate("what", images=[img], plan=f"vispruner:keep={keep},important_ratio={ratio}",
                              max_new_tokens=1)
    finally:
        hook.remove()
    assert res.kept[0].tolist() == want
    torch.testing.assert_close(res.scores[0], cls_row[:, 1:].float().mean(0), atol=1e-5, rtol=1e-4)
    first = int((inputs["input_ids"][0] == engine.model.config.image_token_id).nonzero()[0])
    with torch.no_grad():
        projected = engine.model.model.multi_modal_projector(hidden[1:][want][None].to(engine.model.dtype))[0]
    torch.testing.assert_close(seen[0][0, first:first + keep].float(), projected.float(), atol=1e-4, rtol=1e-4)

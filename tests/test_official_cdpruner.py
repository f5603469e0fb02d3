"""`cdpruner` against a reference transcribed from the official code path, on fixed signals at LLaVA-1.5
geometry (576 projected tokens, CLIP image / text embeddings of their own width) and the tiny models' (64), and
through the engine on the shipped tiny LLaVA and tiny Qwen2-VL (projected tokens and the question's LLM input
embeddings computed here, the surrogate relevance signal ``llm.instruction``)."""
import os
import types

import pytest
import torch

from tokensieve import shipped
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, get_pruner
from tokensieve.pruners import cdpruner as cp

SCENE = os.path.join(os.path.dirname(__file__), "..", "examples", "scene.png")
QUESTION = "what colour is the circle ?"


def official_cdpruner(image_features, image_embeds, text_embeds, visual_token_num, theta=None):
    """The official CDPruner token selection, line for line.

    Transcribed from Theia-4869/CDPruner, ``llava/model/llava_arch.py``, ``LlavaMetaForCausalLM.encode_images``
    (from the line after ``mm_projector``: image_features [B, N, D] are the projector's outputs), with the
    signals ``llava/model/multimodal_encoder/clip_encoder.py``, ``CLIPVisionTower.forward`` gives:
    image_embeds [B, N, C] (``visual_projection(post_layernorm(feature layer))``), text_embeds [M, C] (the
    CLIP text tower's ``text_embeds``, one row per 77-token segment). ``theta``: the official code's commented-out
    lines, run uncommented. Returns (index_masks [B, N] bool, relevance [B, N]).
    """
    B, N, D = image_features.shape
    device = image_features.device

    # [CDPruner] Calculate cosine similarity
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # (B, N, D)
    image_normalized = image_normalized.float()  # (B, N, D)
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))  # (B, N, N)

    # [CDPruner] Calculate query relevance
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)  # (B, N, C)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)  # (M, C)
    relevance = torch.matmul(image_embeds, text_embeds.t())  # (B, N, M)
    relevance = (-relevance).mean(dim=-1)  # (B, N)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())  # (B, N)

    # [CDPruner] Construct kernel matrix
    # You can use an additional hyperparameter theta to control the influence of the relevance score.
    if theta is not None:
        alpha = theta / (2 * (1 - theta))
        relevance = torch.exp(alpha * relevance)  # (B, N)
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)  # (B, N, N)

    # [CDPruner] Fast MAP inference of conditional DPP
    cis = torch.zeros((visual_token_num, B, N), device=device)  # (T, B, N)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N)
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)  # (T, B)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j

        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')

    select_idx = torch.sort(select_idx.t()).values  # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, select_idx, True)
    return index_masks, relevance


def official_kept(feats, image_embeds, text_embeds, keep, theta=None):
    """feats [N, D], image_embeds [N, C], text_embeds [M, C] -> (official kept indices ascending, relevance [N])."""
    mask, rel = official_cdpruner(feats[None], image_embeds[None], text_embeds, keep, theta)
    return mask[0].nonzero().flatten().tolist(), rel[0]


def fixed_signals(n, seed, dim, embed, segments):
    """Projected tokens [N, D] (clustered, uneven norms), CLIP image embeds [N, C], text embeds [M, C]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=g)
    feats = centres[torch.randint(0, 8, (n,), generator=g)] + 0.7 * torch.randn(n, dim, generator=g)
    feats = feats * (0.2 + 3 * torch.rand(n, 1, generator=g))
    image_embeds = torch.randn(n, embed, generator=g) + 0.5
    text_embeds = torch.randn(segments, embed, generator=g) + 0.5
    return feats, image_embeds, text_embeds


CASES = [(576, 4096, 768, 192), (576, 4096, 768, 128), (576, 4096, 768, 64), (576, 4096, 768, 16),
         (64, 64, 32, 32), (64, 64, 32, 16), (64, 64, 32, 8), (64, 64, 32, 1)]


@pytest.mark.parametrize("n,dim,embed,keep", CASES)
@pytest.mark.parametrize("seed,segments", [(0, 1), (1, 1), (2, 3)])
def test_matches_official_on_fixed_signals(n, dim, embed, keep, seed, segments):
    """The official signals (CLIP image / text embeddings of their own width): the same kept set and relevance."""
    feats, image_embeds, text_embeds = fixed_signals(n, seed, dim, embed, segments)
    kept, rel = cp.cdpruner_select(feats, image_embeds, text_embeds, keep)
    want, want_rel = official_kept(feats, image_embeds, text_embeds, keep)
    assert len(want) == keep and kept.tolist() == want
    torch.testing.assert_close(rel, want_rel, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side,keep", [(24, 192), (24, 128), (24, 64), (8, 32), (8, 16), (8, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_pruner_matches_official_on_the_surrogate_signal(side, keep, seed):
    """The registered pruner: relevance of its tokens to the instruction rows (the LLM input space), the same
    kept set as the official code given those tokens as both its projected features and its image embeds."""
    feats, _, _ = fixed_signals(side * side, seed, 256, 8, 1)
    instruction = torch.randn(5, 256, generator=torch.Generator().manual_seed(seed + 10))
    sel = get_pruner("cdpruner").select(StageInput(tokens=feats, keep=keep, coords=grid_coords(side, side),
                                                   instruction=instruction))
    want, want_rel = official_kept(feats, feats, instruction, keep)
    assert sel.keep_idx.tolist() == want
    torch.testing.assert_close(sel.scores, want_rel, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("theta", [0.2, 0.5, 0.8])
def test_the_commented_out_theta_weighting_matches_official(theta):
    feats, _, _ = fixed_signals(576, 3, 1024, 8, 1)
    instruction = torch.randn(7, 1024, generator=torch.Generator().manual_seed(3))
    sel = get_pruner("cdpruner").select(StageInput(tokens=feats, keep=128, coords=grid_coords(24, 24),
                                                   instruction=instruction, options={"theta": theta}))
    want, want_rel = official_kept(feats, feats, instruction, 128, theta)
    assert sel.keep_idx.tolist() == want and want != official_kept(feats, feats, instruction, 128)[0]
    torch.testing.assert_close(sel.scores, want_rel, atol=1e-5, rtol=1e-5)


def test_relevance_changes_the_kept_set():
    """Conditioning matters: another instruction, or none (plain DPP on similarity), keeps another set."""
    feats, image_embeds, text_embeds = fixed_signals(576, 0, 4096, 768, 1)
    kept = cp.cdpruner_select(feats, image_embeds, text_embeds, 64)[0].tolist()
    other = cp.cdpruner_select(feats, image_embeds, -text_embeds, 64)[0].tolist()
    plain = cp.greedy_map(cp.conditional_kernel(feats, torch.ones(576)), 64, torch.ones(576)).sort().values.tolist()
    assert kept != other and kept != plain


def test_where_the_official_gains_run_out_we_keep_keep_tokens():
    """64 tokens of width 8 (kernel rank 8): the official gains stay positive (by rounding) up to 15 picks and
    the sets agree; at T = 32 the official loop divides by the root of a non-positive gain and picks NaN-scored
    duplicates (18 distinct kept); ours keeps its positive-gain picks and fills with the unpicked tokens of
    highest relevance (32 kept)."""
    feats, image_embeds, text_embeds = fixed_signals(64, 0, 8, 8, 1)
    for keep in range(1, 16):
        assert cp.cdpruner_select(feats, image_embeds, text_embeds, keep)[0].tolist() == \
            official_kept(feats, image_embeds, text_embeds, keep)[0]
    assert len(official_kept(feats, image_embeds, text_embeds, 32)[0]) == 18
    kept, rel = cp.cdpruner_select(feats, image_embeds, text_embeds, 32)
    greedy = set(official_kept(feats, image_embeds, text_embeds, 15)[0])
    assert len(kept) == 32 and greedy <= set(kept.tolist())
    rest = sorted(set(kept.tolist()) - greedy)
    others = [i for i in range(64) if i not in greedy and i not in rest]
    assert min(rel[rest]) >= max(rel[others])  # the fill: highest relevance first


@pytest.mark.parametrize("broken", ["relevance_not_applied", "similarity_wrong_axis", "relevance_not_negated"])
def test_a_broken_method_fails_the_comparison(monkeypatch, broken):
    """The comparison can fail: no relevance in the kernel, features normalised over the token axis, or the
    relevance's sign flipped each keep another set."""
    if broken == "relevance_not_applied":
        monkeypatch.setattr(cp, "relevance", lambda image, text: torch.ones(image.shape[0]))
    elif broken == "similarity_wrong_axis":
        normalize = torch.nn.functional.normalize
        monkeypatch.setattr(cp, "F", types.SimpleNamespace(normalize=lambda x, dim: normalize(x, dim=0)))
    else:
        real = cp.relevance
        monkeypatch.setattr(cp, "relevance", lambda image, text: real(image, -text))
    feats, image_embeds, text_embeds = fixed_signals(576, 0, 4096, 768, 1)
    assert cp.cdpruner_select(feats, image_embeds, text_embeds, 64)[0].tolist() != \
        official_kept(feats, image_embeds, text_embeds, 64)[0]


# ---- through the engine on the shipped tiny models -------------------------------------------------

def _projected(engine, inputs):
    """The image's visual tokens as the LLM receives them unpruned [N, D], computed here from the model."""
    model = engine.model
    with torch.no_grad():
        if model.config.model_type == "llava":
            layer = model.config.vision_feature_layer
            hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
            return model.model.multi_modal_projector(hidden[layer][:, 1:])[0]
        return model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output


def _question_embeds(engine, question):
    """The question's tokens (no special tokens, no template) through the LLM's input embeddings [M, D]."""
    ids = engine.processor.tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return engine.model.get_input_embeddings()(ids)[0]


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-qwen2-vl"])
def shipped_engine(request):
    import tokensieve

    engine = tokensieve.load(shipped.path(request.param))
    yield engine
    engine.close()


@pytest.mark.parametrize("keep,question", [(16, QUESTION), (32, QUESTION), (8, "is there a square ?")])
def test_engine_matches_official_on_shipped_tiny_models(shipped_engine, keep, question):
    """Kept set = the official selection on the projected tokens with the question's embeddings as its
    relevance signal; the LLM's visual inputs are the kept projected tokens (nothing merged)."""
    engine = shipped_engine
    inputs = engine.prepare(question, images=[SCENE])
    projected = _projected(engine, inputs).float()
    want, want_rel = official_kept(projected, projected, _question_embeds(engine, question).float(), keep)
    seen = []
    hook = engine.adapter.llm_layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    try:
        res = engine.generate(question, images=[SCENE], plan=f"cdpruner:keep={keep}", max_new_tokens=1)
    finally:
        hook.remove()
    assert res.kept[0].tolist() == want
    torch.testing.assert_close(res.scores[0], want_rel, atol=1e-5, rtol=1e-4)
    ids = inputs["input_ids"][0]
    first = int(torch.isin(ids, torch.tensor(engine.adapter.visual_token_ids)).nonzero()[0])
    torch.testing.assert_close(seen[0][0, first:first + keep].float(), projected[want], atol=1e-5, rtol=1e-4)


def test_the_instruction_pass_is_metered_apart(shipped_engine):
    """scoring_s (its time, apart from prefill_s) and scoring_flops (a lookup: 0) on an image request."""
    res = shipped_engine.generate(QUESTION, images=[SCENE], plan="cdpruner:keep=16", max_new_tokens=1)
    assert res.stats["scoring_s"] > 0 and res.stats["scoring_flops"] == 0
    plain = shipped_engine.generate(QUESTION, images=[SCENE], plan="divprune:keep=16", max_new_tokens=1)
    assert "scoring_s" not in plain.stats


def test_cdpruner_acts_before_the_llm_only():
    from tokensieve.engine.errors import PlanError
    from tokensieve.engine.plan import Plan

    with pytest.raises(PlanError, match="cdpruner cannot act at 'llm'"):
        Plan.parse("cdpruner:where=llm,layer=2,keep=16")

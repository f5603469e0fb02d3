"""`divprune` against DivPrune's official code (vbdi/divprune), transcribed below as a reference.

Fixed projected features at LLaVA-1.5's geometry (576 tokens, 24 x 24) and the tiny LLaVA's
(64, 8 x 8), several budgets; then through the engine, where the reference reads the projected
features the LLM receives (computed in this test from the tower's hidden states and the projector).
"""
import pytest
import torch

from conftest import noise_image
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, get_pruner


def official_divprune(visual_feature_vectors: torch.Tensor, threshold_terms: int) -> tuple:
    """Reference transcribed from vbdi/divprune, LLaVA/llava/model/llava_arch.py,
    LlavaMetaForCausalLM.pairwise_cosine_similarity and .DivPrune (called from
    prepare_inputs_labels_for_multimodal with LAYER_INDEX=0 on the LLM input embeddings of the image,
    i.e. the projected features; ``threshold_terms`` = round(SUBSET_RATIO x N), here given directly).
    Distance 1 - cos; the first pick maximises the second smallest entry of its column (its nearest
    other token), each next one the min over the rows already picked. Returns (picks in order [k],
    the smallest margin between the best and second best score over all steps)."""
    norm = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm, norm.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    margin = float("inf")
    for i in range(threshold_terms):
        if i == 0:
            scores = torch.topk(cosine_matrix, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(cosine_matrix, 0, s[:i]), dim=0).values
        s[i] = torch.argmax(scores)
        top2 = scores.topk(2).values
        margin = min(margin, float(top2[0] - top2[1]))
    return s, margin


def features(n: int, dim: int, seed: int) -> torch.Tensor:
    """[n, dim] low-rank + noise (neighbouring-token structure like real features, no exact duplicates)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g) @ torch.randn(12, dim, generator=g) + 0.5 * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("side,budgets", [(24, (192, 128, 64, 56)), (8, (32, 16, 9))])
def test_divprune_pure_matches_official(side, budgets):
    x = features(side * side, 256, seed=side)
    for keep in budgets:
        picks, margin = official_divprune(x, keep)
        assert margin > 1e-5  # no near ties: the kept set does not hang on rounding
        sel = get_pruner("divprune").select(StageInput(tokens=x, keep=keep, coords=grid_coords(side, side)))
        assert sel.keep_idx.tolist() == sorted(picks.tolist())


def _projected_features(path: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """[P, D] what the LLM receives for image 0: the feature layer's patch hidden states through the projector
    (vision_feature_layer=-2, strategy "default": CLS dropped), computed here from the unmodified model."""
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
        return model.model.multi_modal_projector(hidden[:, 1:])[0]


@pytest.mark.parametrize("keep", [16, 9, 6])
def test_divprune_engine_matches_official(engine_for, tiny_path, keep):
    engine, img = engine_for("llava"), noise_image(13)
    x = _projected_features(tiny_path("llava"), engine.prepare("x", images=[img])["pixel_values"])
    picks, margin = official_divprune(x, keep)
    assert margin > 1e-6
    res = engine.generate("what", images=[img], plan=f"divprune:keep={keep}", max_new_tokens=1)
    assert res.kept[0].tolist() == sorted(picks.tolist())

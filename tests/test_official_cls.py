"""`cls` against VTC-CLS's official code (THU-MIG/VTC-CLS), transcribed below as a reference.

Fixed CLIP attentions at LLaVA-1.5's geometry (577 = CLS + 24 x 24 patches) and the tiny LLaVA's
(65 = CLS + 8 x 8), several budgets; then through the engine, where the reference reads the tower's
full eager attention computed in this test (the CLS rows the engine records must be those).
"""
import pytest
import torch

from conftest import noise_image
from test_pruners import _eager_tower
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, TowerRecord, get_pruner


def official_vtc_cls_keep(attentions: list, start_layer: int, token_num: int) -> torch.Tensor:
    """Reference transcribed from THU-MIG/VTC-CLS: llava/model/multimodal_encoder/clip_encoder.py,
    CLIPVisionTower.cls_token_only (``output_attentions`` of every CLIP layer, each [1, H, S, S]; the
    CLS row, head mean, of layers ``attentions[start_layer:-1]`` summed: the LLM's features are
    hidden_states[-2], so that is start_layer .. the feature layer) and llava/model/llava_arch.py,
    LlavaMetaForCausalLM.encode_images (``method == "VTC-CLS"``: top ``token_num`` of the sum, then the
    features put back in original order by argsort of their position ids). Returns [token_num] sorted."""
    rows = [a.squeeze(0).mean(dim=0)[0, 1:] for a in attentions[start_layer:-1]]
    cls_attn_sum = torch.sum(torch.stack(rows), dim=0)  # [P]
    _, idx = torch.topk(cls_attn_sum, token_num, dim=0, largest=True)
    return idx[torch.argsort(idx)]


def clip_attentions(layers: int, heads: int, side: int, seed: int) -> list:
    """Per layer a [1, H, S, S] softmax (S = 1 + side^2), no mask (the CLIP tower attends everywhere)."""
    g = torch.Generator().manual_seed(seed)
    s = 1 + side * side
    return [(torch.randn(1, heads, s, s, generator=g) * 2.5).softmax(-1) for _ in range(layers)]


def assert_no_tie(scores: torch.Tensor, k: int) -> None:
    s = scores.sort(descending=True).values
    if k < s.numel():
        assert float(s[k - 1] - s[k]) > 1e-6 * float(s[0]), "fixture has a near tie at the budget boundary"


def ours_from_record(attentions: list, layers_option, keep: int, side: int) -> tuple:
    """The pruner fed as the engine feeds it: the CLS rows [1, H, S] of the layers it asked to record."""
    pruner = get_pruner("cls")
    feature_layer = len(attentions) - 2  # vision_feature_layer = -2
    options = {} if layers_option is None else {"layers": layers_option}
    layers = pruner.tower_layers(feature_layer, options)
    rec = TowerRecord(prefix=1, cls={layer: attentions[layer][:, :, 0] for layer in layers})
    score = pruner.tower_score(rec, layers)[0]
    tokens = torch.randn(side * side, 8, generator=torch.Generator().manual_seed(3))
    sel = pruner.select(StageInput(tokens=tokens, keep=keep, coords=grid_coords(side, side), tower_score=score,
                                   options=options))
    return sel, score


@pytest.mark.parametrize("side,budgets", [(24, (192, 128, 64)), (8, (32, 16, 9))])
def test_cls_pure_matches_official(side, budgets):
    attentions = clip_attentions(layers=6, heads=4, side=side, seed=side)  # feature layer = 4 (hidden_states[-2])
    for start_layer in (4, 2, 0):  # 4: the feature layer alone (our default); 2, 0: the ensemble
        layers_option = None if start_layer == 4 else list(range(start_layer, 5))
        for keep in budgets:
            sel, score = ours_from_record(attentions, layers_option, keep, side)
            assert_no_tie(score, keep)
            assert sel.keep_idx.tolist() == official_vtc_cls_keep(attentions, start_layer, keep).tolist()
            expected = sum(a[0].mean(0)[0, 1:] for a in attentions[start_layer:-1])
            torch.testing.assert_close(sel.scores, expected)


@pytest.mark.parametrize("keep", [16, 9])
def test_cls_engine_matches_official(engine_for, tiny_path, keep):
    engine, img = engine_for("llava"), noise_image(12)
    attn = _eager_tower(tiny_path("llava"), engine.prepare("x", images=[img])["pixel_values"])
    attentions = [a[None] for a in attn]  # as output_attentions: one [1, H, S, S] per CLIP layer
    assert engine.adapter.feature_layer == len(attentions) - 2  # the official slicing [start:-1] assumes it
    for start_layer, plan in ((1, f"cls:keep={keep}"), (0, f"cls:keep={keep},layers=0/1")):
        res = engine.generate("what", images=[img], plan=plan, max_new_tokens=1)
        expected = official_vtc_cls_keep(attentions, start_layer, keep)
        assert_no_tie(sum(a[0].mean(0)[0, 1:] for a in attentions[start_layer:-1]), keep)
        assert res.kept[0].tolist() == expected.tolist(), plan

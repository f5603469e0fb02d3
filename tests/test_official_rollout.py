"""`rollout` against attention rollout's official code (samiraabnar/attention_flow), transcribed below.

Fixed per-layer queries and keys at LLaVA-1.5's geometry (577 = CLS + 24 x 24) and the tiny
LLaVA's (65 = CLS + 8 x 8): the reference materialises every attention matrix and multiplies them;
ours propagates the CLS row from the recorded q/k. Then through the engine (pre-LLM and a vision
stage), the reference reading the tower's eager attention computed in this test.
"""
import numpy as np
import pytest
import torch

from conftest import noise_image
from test_pruners import _eager_tower
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, TowerRecord, get_pruner


def official_joint_attention(att_mat: np.ndarray) -> np.ndarray:
    """Reference transcribed from samiraabnar/attention_flow, attention_graph_util.py,
    compute_joint_attention(att_mat, add_residual=True), with att_mat [L, S, S] the head-averaged
    attention of each layer (as bert_example.ipynb builds it: sum over heads / heads). Residual
    added and rows renormalised, then joint[i] = aug[i] . joint[i-1]. (jacobgil/vit-explain,
    vit_rollout.py, rollout() with head_fusion="mean", discard_ratio=0 computes the same.)"""
    aug = att_mat + np.eye(att_mat.shape[1])[None]
    aug = aug / aug.sum(axis=-1)[..., None]
    joint = np.zeros(aug.shape)
    joint[0] = aug[0]
    for i in range(1, aug.shape[0]):
        joint[i] = aug[i].dot(joint[i - 1])
    return joint


def official_rollout_scores(attentions: list) -> torch.Tensor:
    """[P] the CLS row of the last joint attention, patches only (float64), from [H, S, S] per layer."""
    att_mat = np.stack([a.double().numpy().sum(axis=0) / a.shape[0] for a in attentions])
    return torch.from_numpy(official_joint_attention(att_mat)[-1][0, 1:])


def assert_no_tie(scores: torch.Tensor, k: int) -> None:
    s = scores.sort(descending=True).values
    if k < s.numel():
        assert float(s[k - 1] - s[k]) > 1e-6 * float(s[0]), "fixture has a near tie at the budget boundary"


def _topk(scores, k):
    return sorted(torch.topk(scores, k).indices.tolist())


@pytest.mark.parametrize("side,budgets", [(24, (192, 128, 64)), (8, (32, 16, 9))])
def test_rollout_pure_matches_official(side, budgets):
    layers, heads, d, s = 4, 4, 16, 1 + side * side
    g = torch.Generator().manual_seed(side)
    qk = [(torch.randn(1, heads, s, d, generator=g), torch.randn(1, heads, s, d, generator=g)) for _ in range(layers)]
    attentions = [(q[0] @ k[0].transpose(-1, -2) * d ** -0.5).softmax(-1) for q, k in qk]  # [H, S, S]
    expected = official_rollout_scores(attentions)
    pruner = get_pruner("rollout")
    recorded = pruner.tower_layers(layers - 1, {})
    assert recorded == list(range(layers))  # every layer up to the stage
    score = pruner.tower_score(TowerRecord(prefix=1, qk=dict(enumerate(qk))), recorded)[0]
    torch.testing.assert_close(score.double(), expected, atol=1e-7, rtol=1e-5)
    tokens = torch.randn(side * side, 8, generator=g)
    for keep in budgets:
        assert_no_tie(expected, keep)
        sel = pruner.select(StageInput(tokens=tokens, keep=keep, coords=grid_coords(side, side), tower_score=score))
        assert sel.keep_idx.tolist() == _topk(expected, keep)


@pytest.mark.parametrize("plan,last,keep", [("rollout:keep=10", None, 10), ("rollout:keep=24", None, 24),
                                            ("rollout:where=vision,layer=1,keep=20", 0, 20)])
def test_rollout_engine_matches_official(engine_for, tiny_path, plan, last, keep):
    engine, img = engine_for("llava"), noise_image(14)
    attn = _eager_tower(tiny_path("llava"), engine.prepare("x", images=[img])["pixel_values"])
    last = engine.adapter.feature_layer if last is None else last  # the layers the patches went through
    expected = official_rollout_scores(attn[: last + 1])
    assert_no_tie(expected, keep)
    res = engine.generate("what", images=[img], plan=plan, max_new_tokens=1)
    assert res.kept[0].tolist() == _topk(expected, keep)
    torch.testing.assert_close(res.scores[0].double(), expected, atol=1e-6, rtol=1e-4)

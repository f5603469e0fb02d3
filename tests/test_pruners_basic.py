"""The engine-core pruners (random, uniform, fastv) on fixed tensors, against their definitions."""
import torch

from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, get_pruner


def _inp(n=64, keep=16, side=8, attn=None, **options):
    torch.manual_seed(0)
    return StageInput(tokens=torch.randn(n, 8), keep=keep, coords=grid_coords(side, n // side), attn=attn, options=options)


def _attn(n=64, heads=4):
    return torch.softmax(torch.randn(heads, n), -1)


def test_random_is_seeded():
    a = get_pruner("random").select(_inp(seed=3)).keep_idx
    assert torch.equal(a, get_pruner("random").select(_inp(seed=3)).keep_idx)
    assert not torch.equal(a, get_pruner("random").select(_inp(seed=4)).keep_idx)
    gen = torch.Generator().manual_seed(3)
    assert a.tolist() == torch.randperm(64, generator=gen)[:16].sort().values.tolist()


def test_uniform_is_an_even_lattice():
    # 8x8 grid, 16 tokens: every other row and column, at the cell centres (1, 3, 5, 7)
    expected = [r * 8 + c for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]
    assert get_pruner("uniform").select(_inp(keep=16)).keep_idx.tolist() == expected
    # 4 of them: the centres of the four quadrants
    assert get_pruner("uniform").select(_inp(keep=4)).keep_idx.tolist() == [2 * 8 + 2, 2 * 8 + 6, 6 * 8 + 2, 6 * 8 + 6]


def test_uniform_splits_budget_over_images():
    coords = torch.cat([grid_coords(4, 4, item=0), grid_coords(4, 4, item=1)])
    sel = get_pruner("uniform").select(StageInput(tokens=torch.randn(32, 4), keep=8, coords=coords))
    assert sel.keep_idx.tolist() == [5, 7, 13, 15, 21, 23, 29, 31]


def test_fastv_is_topk_of_head_mean():
    attn = _attn()
    sel = get_pruner("fastv").select(_inp(keep=5, attn=attn))
    mean = attn.sum(0) / attn.shape[0]
    expected = sorted(sorted(range(64), key=lambda j: -float(mean[j]))[:5])
    assert sel.keep_idx.tolist() == expected
    torch.testing.assert_close(sel.scores, mean)

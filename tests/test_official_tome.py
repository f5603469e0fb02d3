"""`tome` against ToMe's official code (facebookresearch/ToMe), transcribed below as a reference.

The official code merges r tokens per ViT layer: bipartite_soft_matching on that layer's head-mean
keys, then merge_wavg (size-weighted average; sizes carried). Our stage removes N - keep tokens at
one point, so the reference applies the official round repeatedly with r = tokens still to remove
(the official function caps each round at half the tokens), the merged tokens in the official order
(unmerged A tokens, then B) and, there being no next layer to give fresh keys, the metric merged by
merge_wavg like the tokens (our documented choice). Kept sets, merge groups and merged features are
compared at LLaVA-1.5's geometry (576, 24 x 24), the tiny LLaVA's (64, 8 x 8) and odd counts, without
a class token (pre-LLM features) and with one (vision-tower stages, where CLIP's CLS leads the
sequence); then through the engine with the keys and features computed in this test.
"""
import math

import pytest
import torch

from conftest import noise_image
from test_pruners import _eager_tower
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, get_pruner


def official_bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False, margins=None):
    """Reference transcribed from facebookresearch/ToMe, tome/merge.py, bipartite_soft_matching (batch
    dimension dropped; no distill token): metric [T, C] -> merge(x [T, C'], mode) -> [T - r', C'].
    ``mode=None`` (not in the official code) keeps each destination's own value: used here to follow
    which original token each output token is; ``margins`` (not official either) collects the gap between
    the r-th and (r+1)-th best match, so a fixture whose kept set hangs on a tie is caught."""
    protected = 1 if class_token else 0
    t = metric.shape[0]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[0::2], metric[1::2]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    if margins is not None and r < edge_idx.numel() - protected:
        margins.append(float(node_max[edge_idx[r - 1]] - node_max[edge_idx[r]]))
    unm_idx, src_idx = edge_idx[r:], edge_idx[:r]
    dst_idx = node_idx[src_idx]
    if class_token:
        unm_idx = unm_idx.sort().values

    def merge(x: torch.Tensor, mode="mean") -> torch.Tensor:
        src, dst = x[0::2], x[1::2]
        unm = src[unm_idx]
        if mode is not None:
            dst = dst.scatter_reduce(0, dst_idx[:, None].expand(r, x.shape[1]), src[src_idx], reduce=mode)
        return torch.cat([unm, dst])

    return merge


def official_merge_wavg(merge, x: torch.Tensor, size: torch.Tensor):
    """facebookresearch/ToMe, tome/merge.py, merge_wavg: x [T, C], size [T, 1] -> merged x, new sizes."""
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def official_tome(x, metric, keep: int, size=None, class_token: bool = False):
    """Official rounds until ``keep`` tokens (+ the class token) remain -> (x, size [k, 1], source [k, T]
    (merge_source: which originals each output token holds), ids [k]: the original token each output is)."""
    t = x.shape[0]
    size = torch.ones(t, 1) if size is None else size.float()[:, None]
    source = torch.eye(t)
    ids = torch.arange(t, dtype=torch.float)[:, None]
    margins = []
    while x.shape[0] > keep + class_token:
        merge = official_bipartite_soft_matching(metric, x.shape[0] - keep - class_token, class_token, margins)
        x, new_size = official_merge_wavg(merge, x, size)
        metric, _ = official_merge_wavg(merge, metric, size)
        size = new_size
        source = merge(source, mode="amax")
        ids = merge(ids, mode=None)
    assert min(margins, default=1.0) > 1e-6, "fixture has a near tie at a round's boundary"
    return x, size, source, ids[:, 0].long()


def compare(sel, x_ref, source_ref, ids_ref, offset: int = 0) -> None:
    """Our Selection against the official output (``offset``: the class token leads the official one)."""
    if offset:
        assert int(ids_ref[0]) == 0 and source_ref[0].nonzero().flatten().tolist() == [0]  # CLS alone, first
        x_ref, source_ref, ids_ref = x_ref[1:], source_ref[1:, 1:], ids_ref[1:] - 1
    order = ids_ref.argsort()
    assert sel.keep_idx.tolist() == ids_ref[order].tolist()
    official_groups = [source_ref[j].nonzero().flatten().tolist() for j in order]
    ours_groups = [(sel.groups == p).nonzero().flatten().tolist() for p in range(sel.keep_idx.numel())]
    assert ours_groups == official_groups
    torch.testing.assert_close(sel.tokens.float(), x_ref[order], atol=1e-5, rtol=1e-5)


def fixture(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randn(n, 8, generator=g)  # features, keys (the metric)


def select(x, keys, keep, coords, sizes=None, prefix=0):
    inp = StageInput(tokens=x, keep=keep, coords=coords, keys=keys, prefix=prefix,
                     sizes=torch.ones(x.shape[0]) if sizes is None else sizes)
    return get_pruner("tome").select(inp)


@pytest.mark.parametrize("h,w,budgets", [(24, 24, (400, 288, 192, 128, 64, 4)), (8, 8, (40, 32, 16, 9, 3)),
                                         (7, 7, (30, 20, 10, 3)), (7, 9, (40, 31, 12))])
def test_tome_pure_matches_official(h, w, budgets):
    x, keys = fixture(h * w, seed=h * w)
    for keep in budgets:
        x_ref, _, source, ids = official_tome(x, keys, keep)
        compare(select(x, keys, keep, grid_coords(h, w)), x_ref, source, ids)


def test_tome_carried_sizes_match_official():
    """Tokens that already stand for several (an earlier stage merged them): the official size-weighted rounds."""
    x, keys = fixture(64, seed=5)
    sizes = torch.randint(1, 5, (64,), generator=torch.Generator().manual_seed(6)).float()
    for keep in (40, 20):
        x_ref, _, source, ids = official_tome(x, keys, keep, size=sizes)
        compare(select(x, keys, keep, grid_coords(8, 8), sizes=sizes), x_ref, source, ids)


@pytest.mark.parametrize("side,budgets", [(24, (400, 288, 100)), (8, (40, 32, 9))])
def test_tome_with_class_token_matches_official(side, budgets):
    """A vision-tower stage: the official code protects CLIP's CLS, which sits first in the A set."""
    n = side * side
    x, keys = fixture(n + 1, seed=n)  # row 0: the CLS token
    for keep in budgets:
        x_ref, _, source, ids = official_tome(x, keys, keep, class_token=True)
        compare(select(x[1:], keys[1:], keep, grid_coords(side, side), prefix=1), x_ref, source, ids, offset=1)


def _llm_inputs_embeds(engine):
    """Forward pre-hook on the language model catching the inputs_embeds of its first (prefill) call."""
    caught = []

    def hook(module, args, kwargs):
        if not caught:
            caught.append(kwargs["inputs_embeds"][0].detach().clone())

    return caught, engine.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def _tower_hidden(path, pixel_values):
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return model, hidden


@pytest.mark.parametrize("keep", [40, 20, 9])
def test_tome_engine_pre_llm_matches_official(engine_for, tiny_path, keep):
    """Before the LLM: metric = head-mean keys of the feature layer's patches (recorded by the engine),
    merged tokens = the features the stage works on (the projector's output, or its input when the
    pruner merges before the projector), each kept token at its representative's slot."""
    engine, img = engine_for("llava"), noise_image(15)
    pixel_values = engine.prepare("x", images=[img])["pixel_values"]
    store = {}
    _eager_tower(tiny_path("llava"), pixel_values, store)
    fl = engine.adapter.feature_layer
    keys = store["k"][fl][:, 1:].mean(0)  # [P, d] what ToMe's attention returns: k.mean over heads
    model, hidden = _tower_hidden(tiny_path("llava"), pixel_values)
    tower_feats = hidden[fl + 1][0, 1:]  # hidden_states[-2]: the feature layer's output, patches only
    before_projector = get_pruner("tome").merge_space == "tower"
    with torch.no_grad():
        x = tower_feats if before_projector else model.model.multi_modal_projector(tower_feats)
        x_ref, _, source, ids = official_tome(x, keys, keep)
        merged = model.model.multi_modal_projector(x_ref) if before_projector else x_ref
    caught, handle = _llm_inputs_embeds(engine)
    try:
        res = engine.generate("what", images=[img], plan=f"tome:keep={keep}", max_new_tokens=1)
    finally:
        handle.remove()
    order = ids.argsort()
    assert res.kept[0].tolist() == ids[order].tolist()
    assert [(res.groups[0] == p).nonzero().flatten().tolist() for p in range(keep)] == \
        [source[j].nonzero().flatten().tolist() for j in order]
    inputs = engine.prepare("what", images=[img])
    first = int((inputs["input_ids"][0] == engine.model.config.image_token_id).nonzero()[0])
    pad = caught[0].shape[0] - (inputs["input_ids"].shape[1] - 64 + keep)  # left padding, if any
    torch.testing.assert_close(caught[0][pad + first:pad + first + keep], merged[order], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keep", [40, 24])
def test_tome_engine_vision_stage_matches_official(engine_for, tiny_path, keep):
    """Inside the tower before layer 1: the official round in layer 0 (its keys, CLS protected) on the
    tokens leaving layer 0 (ours merges after that layer's MLP; the selection is the same)."""
    engine, img = engine_for("llava"), noise_image(16)
    pixel_values = engine.prepare("x", images=[img])["pixel_values"]
    store = {}
    _eager_tower(tiny_path("llava"), pixel_values, store)
    keys = store["k"][0].mean(0)  # [1 + P, d], CLS first
    _, hidden = _tower_hidden(tiny_path("llava"), pixel_values)
    x_ref, _, source, ids = official_tome(hidden[1][0], keys, keep, class_token=True)  # layer 0's output, CLS first
    caught = []
    layer1 = engine.adapter.vision_layers[1]  # hooked after the engine's own pre-hook: sees the merged tokens
    handle = layer1.register_forward_pre_hook(
        lambda m, args, kwargs: caught.append((args[0] if args else kwargs["hidden_states"])[0].clone()), with_kwargs=True)
    try:
        res = engine.generate("what", images=[img], plan=f"tome:where=vision,layer=1,keep={keep}", max_new_tokens=1)
    finally:
        handle.remove()
    assert int(ids[0]) == 0 and source[0].nonzero().flatten().tolist() == [0]  # the CLS, alone and first
    torch.testing.assert_close(caught[0][0], x_ref[0])
    x_ref, source, ids = x_ref[1:], source[1:, 1:], ids[1:] - 1
    order = ids.argsort()
    assert res.kept[0].tolist() == ids[order].tolist()
    assert [(res.groups[0] == p).nonzero().flatten().tolist() for p in range(keep)] == \
        [source[j].nonzero().flatten().tolist() for j in order]
    torch.testing.assert_close(caught[0][1:], x_ref[order], atol=1e-5, rtol=1e-4)

"""InternVL (issue 47): dynamic tiles + thumbnail, 2 x 2 pixel-shuffled tokens, a CLS tower, video as the
processor's ``Frame{i}: <img>...</img>`` runs.

The tiny ``make_tiny`` model runs the whole invariant suite through tests/test_invariants.py,
tests/test_native_video.py and tests/test_pruners.py (they walk every family), and transformers' own tester
configuration through tests/test_tester_configs.py; this file adds what those cannot see, each against a
reference built here by hand from the model's own pieces (its tower, its projector, eager attention):
the tile layout of the coords, the shuffle's 2 x 2 blocks, the CLS scores per token, the refusal of
vision-tower stages and the video prompt form.

The tiny model: 32 px tiles of 8 x 8 patches (patch 4), 16 tokens per tile (a 4 x 4 grid), at most 6 tiles.
"""
import pytest
import torch
from transformers import AutoModelForImageTextToText

from tokensieve.engine.errors import PlanError

from conftest import model_calls, noise_image
from test_invariants import ATOL

SIDE = 4  # tokens per tile side: 32 px / patch 4 / shuffle 2


def _model(path, **kw):
    return AutoModelForImageTextToText.from_pretrained(path, **kw).eval()


def _block(h: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """One token's projector input by hand: the 2 x 2 patch block at token (r, c) of a tile's [8, 8, C] grid,
    concatenated row by row (the order the model's pixel_shuffle gives its channels)."""
    return torch.cat([h[2 * r, 2 * c], h[2 * r, 2 * c + 1], h[2 * r + 1, 2 * c], h[2 * r + 1, 2 * c + 1]])


def test_a_wide_image_is_three_by_two_tiles_plus_a_thumbnail(engine_for):
    """40 x 56 px (aspect 1.4): of the grids up to 6 tiles the closest aspect is 3 x 2 (1.5), then the thumbnail:
    7 tower passes; coords: item 0 the 8 x 12 token grid across tiles, item 1 the thumbnail's 4 x 4."""
    engine = engine_for("internvl")
    inputs = engine.prepare("what", images=[noise_image(0, 40, 56)])
    assert inputs["pixel_values"].shape[0] == 7 and engine.adapter.tiles_per_image(inputs) == [7]
    coords = engine.adapter.image_coords(inputs)[0]
    assert coords.shape == (7 * 16, 3)
    grid, thumb = coords[coords[:, 0] == 0], coords[coords[:, 0] == 1]
    assert sorted(map(tuple, grid[:, 1:].tolist())) == [(r, c) for r in range(8) for c in range(12)]
    assert thumb[:, 1:].tolist() == [[r, c] for r in range(4) for c in range(4)]
    assert int((coords[:, 0] == 1).nonzero().min()) == 6 * 16  # the thumbnail's tokens come last


@pytest.mark.parametrize("size", [(40, 56), (48, 48), (30, 30)])
def test_features_sit_at_their_coords(engine_for, tiny_path, size):
    """Each LLM token's feature is the projector of the 2 x 2 patch block its coords name: tile (row // 4,
    col // 4) of the grid (item 0) or the thumbnail (item 1, the last tile), block (row % 4, col % 4) in it.
    Reference: the model's own tower and projector, the blocks gathered by hand."""
    engine = engine_for("internvl")
    inputs = engine.prepare("what", images=[noise_image(1, *size)])
    coords = engine.adapter.image_coords(inputs)[0]
    model = _model(tiny_path("internvl"))
    with torch.no_grad():
        feats = engine.adapter.encode_images(inputs)[0]
        hidden = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 1:]
        hidden = hidden.reshape(hidden.shape[0], 8, 8, -1)
        n_tiles, cols = hidden.shape[0], int(coords[coords[:, 0] == 0, 2].max()) // SIDE + 1
        blocks = []
        for item, row, col in coords.tolist():
            tile = n_tiles - 1 if item == 1 else (row // SIDE) * cols + col // SIDE
            blocks.append(_block(hidden[tile], row % SIDE, col % SIDE))
        expected = model.model.multi_modal_projector(torch.stack(blocks))
    assert feats.shape[0] == coords.shape[0] == n_tiles * 16
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-4)


def test_tower_to_tokens_averages_each_tokens_four_patches(engine_for):
    """Per-patch values (the patch's row and column in its tile) -> per token the mean over its 2 x 2 block:
    (2 r + 0.5, 2 c + 0.5) for the token at tile-local (r, c) of its coords."""
    engine = engine_for("internvl")
    inputs = engine.prepare("what", images=[noise_image(2, 40, 56), noise_image(3, 48, 48)])
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    n_tiles = inputs["pixel_values"].shape[0]
    values = torch.stack([rows, cols], -1).reshape(1, 64, 2).repeat(n_tiles, 1, 1)
    per_image = engine.adapter.tower_to_tokens(values, inputs)
    for tokens, coords in zip(per_image, engine.adapter.image_coords(inputs)):
        expected = (coords[:, 1:] % SIDE).float() * 2 + 0.5
        torch.testing.assert_close(tokens, expected)


def test_cls_scores_are_the_eager_cls_attention_of_each_tokens_patches(engine_for, tiny_path):
    """``cls`` before the LLM scores each token with the head-mean CLS attention of the feature layer (the last),
    averaged over its four patches, and keeps the top k. Reference: plain transformers' eager tower attention."""
    engine = engine_for("internvl")
    image = noise_image(4, 56, 40)
    res = engine.generate("what", images=[image], plan="cls:where=pre_llm,keep=20", max_new_tokens=1)
    inputs = engine.prepare("what", images=[image])
    coords = engine.adapter.image_coords(inputs)[0]
    model = _model(tiny_path("internvl"), attn_implementation="eager")
    with torch.no_grad():
        attn = model.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[-1]
    cls = attn[:, :, 0, 1:].float().mean(1).reshape(-1, 8, 8)  # [tiles, 8, 8] per patch
    n_tiles, cols = cls.shape[0], int(coords[coords[:, 0] == 0, 2].max()) // SIDE + 1
    expected = []
    for item, row, col in coords.tolist():
        tile = n_tiles - 1 if item == 1 else (row // SIDE) * cols + col // SIDE
        r, c = row % SIDE, col % SIDE
        expected.append(cls[tile, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean())
    expected = torch.stack(expected)
    torch.testing.assert_close(res.scores[0].float(), expected, atol=1e-5, rtol=1e-4)
    assert res.kept[0].tolist() == torch.topk(expected, 20).indices.sort().values.tolist()


def test_vision_tower_stages_are_refused_before_any_model_work(engine_for):
    """The shuffle needs every patch of a tile: no stage inside the tower, refused naming where to prune."""
    engine = engine_for("internvl")
    with model_calls(engine) as calls, pytest.raises(PlanError, match="no vision-tower stages; give where=pre_llm"):
        engine.generate("what", images=[noise_image(0)], plan="cls:where=vision,layer=1,keep=0.5")
    assert calls == []


def _video(seed: int, n: int = 4):
    return {"frames": [noise_image(10 * seed + f, 40, 56) for f in range(n)], "video_fps": 4.0}


def test_video_enters_as_the_processors_frame_runs_and_its_text_is_never_pruned(engine_for):
    """4 frames -> ``Frame1: <img>`` + 16 context tokens + ``</img>``, one line per frame (the test tokenizer's
    <|vision_start|> / <|vision_end|> / <image> stand for <img> / </img> / <IMG_CONTEXT>; ``Frame{i}:`` is an
    unknown word to it), built here by hand; a pruning plan drops visual tokens only: the LLM's input rows
    of text are every non-visual prompt token's embedding, in order."""
    engine = engine_for("internvl")
    tok = engine.processor.tokenizer
    inputs = engine.prepare("what", video=_video(0))
    ids = inputs["input_ids"][0].tolist()
    line = [tok.unk_token_id, tok.convert_tokens_to_ids("<|vision_start|>")] + \
        [tok.convert_tokens_to_ids("<image>")] * 16 + [tok.convert_tokens_to_ids("<|vision_end|>")]
    expected = line * 4  # the newlines between lines are whitespace to the word-level tokenizer
    assert any(ids[i:i + len(expected)] == expected for i in range(len(ids)))
    assert inputs["pixel_values"].shape[0] == 4
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = engine.model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        res = engine.generate("what", video=_video(0), plan="random:keep=0.25", max_new_tokens=1)
    finally:
        hook.remove()
    ids_t = inputs["input_ids"][0]
    vis = torch.isin(ids_t, torch.tensor(engine.adapter.visual_token_ids))
    vis_slots, text_slots = vis.nonzero().flatten(), (~vis).nonzero().flatten()
    dropped = vis_slots[~torch.isin(torch.arange(vis_slots.numel()), res.kept[0])]
    embeds = seen["embeds"][0]
    assert embeds.shape[0] == text_slots.numel() + res.stats["kept_tokens"] == text_slots.numel() + 16
    rows = text_slots - torch.searchsorted(dropped, text_slots)
    torch.testing.assert_close(embeds[rows], engine.adapter.embed(ids_t[text_slots][None])[0])


def test_an_image_and_a_video_in_one_request_match_transformers(engine_for, tiny_path):
    """One request with an image (7 tiles) and a 4-frame video: ``pixel_values`` holds the image's tiles then the
    frames; the engine splits them (images vs video tokens by ``image_sizes``) and, with no plan, gives
    transformers' own generate on the same inputs; the image's tokens are no frame's, the video's are frames 0-3."""
    engine = engine_for("internvl")
    req = dict(prompt="what appeared first", images=[noise_image(5, 40, 56)], video=_video(1))
    inputs = engine.prepare_batch([req])
    assert inputs["pixel_values"].shape[0] == 7 + 4
    model = _model(tiny_path("internvl"))
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    res = engine.generate_batch([dict(req, max_new_tokens=4)], output_logits=True)[0]
    n = len(res.token_ids)
    assert res.token_ids == out.sequences[0, inputs["input_ids"].shape[1]:][:n].tolist()
    torch.testing.assert_close(res.logits, torch.stack(out.logits, 1).float()[0, :n], atol=ATOL, rtol=1e-4)
    pruned = engine.generate(req["prompt"], images=req["images"], video=req["video"], plan="uniform:keep=0.5",
                             max_new_tokens=1)
    frames = pruned.frames
    assert frames[:7 * 16].tolist() == [-1] * 112 and frames[112:].tolist() == [f for f in range(4) for _ in range(16)]

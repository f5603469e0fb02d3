"""Training and measuring the tiny Qwen2-VL on native video (issue 29, item 6): batches in exactly the
engine's native-video input, targets per temporal patch of two frames, a tower phase whose gradient
tells the two frames of a patch apart, and one clear error for a model without native video."""
import json
import random

import pytest
import torch

import tokensieve
from tokensieve.eval.shapeworld import heldout, native_video, tiny_models, tower_phase, train_tiny, world
from tokensieve.eval.shapeworld.objectives import N_CLASSES, aux_logits, aux_loss, cell_targets
from tokensieve.eval.shapeworld.video_targets import novelty_targets
from tokensieve.testing import make_tokenizer

IMAGE, GRID = tiny_models.IMAGE, tiny_models.GRID


def _qwen(tmp_path=None):
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.build_qwen2_vl(tok)
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
        proc.save_pretrained(tmp_path)
    return model, proc


def _cell(row: int, col: int) -> tuple[float, float]:
    """(x, y) of a small object filling lattice cell (row, col)."""
    return (col + 0.5) / GRID, (row + 0.5) / GRID


def _four_frames() -> list[world.Scene]:
    """Frame 0: a red circle (uid 0) at (1, 1) and a blue square (uid 1) at (6, 6). Frame 1: the circle moved
    to (1, 2), the square gone, a green triangle (uid 2) new at (3, 3). Frames 2, 3: the circle and triangle."""
    circle0 = world.Obj("circle", "red", "small", *_cell(1, 1), uid=0)
    circle1 = world.Obj("circle", "red", "small", *_cell(1, 2), uid=0)
    square = world.Obj("square", "blue", "small", *_cell(6, 6), uid=1)
    triangle = world.Obj("triangle", "green", "small", *_cell(3, 3), uid=2)
    later = [circle1, triangle]
    return [world.Scene([circle0, square], size=IMAGE)] + [world.Scene(list(later), size=IMAGE) for _ in range(3)]


def test_temporal_groups_hold_every_object_of_the_patch_where_its_latest_frame_shows_it():
    frames = _four_frames()
    groups = native_video.temporal_groups(frames)
    assert len(groups) == 2
    cells = [world.object_cells(g, GRID) for g in groups]
    # patch 0 (frames 0, 1): the circle at frame 1's cell, the square (frame 0 only), the triangle (frame 1 only)
    assert cells[0] == {0: [1 * GRID + 2], 1: [6 * GRID + 6], 2: [3 * GRID + 3]}
    assert cells[1] == {0: [1 * GRID + 2], 2: [3 * GRID + 3]}
    with pytest.raises(ValueError, match="3 frames"):
        native_video.temporal_groups(frames[:3])


def test_native_training_batch_is_the_engines_native_video_input(tmp_path):
    """collate(native=True): the first turn's tokens, the video pixels and the video grid are exactly what the
    engine builds for the same frames in its default video mode."""
    model, proc = _qwen(tmp_path)
    ex = train_tiny.sample_examples(random.Random(0), 1, video=True, turns=2)[0]
    batch = train_tiny.collate(proc, [ex], model.config.get_text_config().eos_token_id, native=True)
    with tokensieve.load(str(tmp_path)) as engine:
        ref = engine.prepare(ex["qas"][0].question, video=[world.render(s) for s in ex["scenes"]])
    n = ref["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n], ref["input_ids"][0])
    assert torch.equal(batch["pixel_values_videos"], ref["pixel_values_videos"])
    assert torch.equal(batch["video_grid_thw"], ref["video_grid_thw"])
    assert "pixel_values" not in batch
    assert batch["cells"].shape == (len(ex["scenes"]) // 2, GRID * GRID, 5)


def test_native_novelty_targets_mark_an_object_new_in_its_first_temporal_patch():
    """The triangle first shows in frame 1, so it is new in patch 0 and old in patch 1; the circle likewise;
    targets sit on the video tokens of the object's cell in each patch (video token k of patch t is
    t * 64 + row * 8 + col in the processor's layout)."""
    model, proc = _qwen()
    frames = _four_frames()
    qa = world.QA("how many distinct objects appeared ?", "3", "distinct", refs=(0, 1, 2))
    batch = train_tiny.collate(proc, [{"scenes": frames, "qas": [qa]}], model.config.get_text_config().eos_token_id,
                               native=True)
    ids = batch["input_ids"][0]
    video = (ids == proc.tokenizer.convert_tokens_to_ids(proc.video_token)).nonzero().flatten()
    assert len(video) == 2 * GRID * GRID
    novelty = batch["novelty"][0]
    expected = torch.full_like(novelty, -100)
    for patch, new in ((0, 1), (1, 0)):
        for row, col in ((1, 2), (3, 3)):
            expected[video[patch * GRID * GRID + row * GRID + col]] = new
    expected[video[6 * GRID + 6]] = 1  # the square, patch 0 only
    assert torch.equal(novelty, expected)
    assert torch.equal(novelty_targets(proc, [{"scenes": native_video.temporal_groups(frames), "qas": [qa]}],
                                       batch["input_ids"]), batch["novelty"])


def test_native_tower_phase_trains_what_tells_the_two_frames_of_a_patch_apart():
    """A still image enters as two copies, so the patch embedding's two temporal kernels get the same
    gradient; on native temporal patches of two different frames they do not."""
    model, proc = _qwen()
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, sum(N_CLASSES))
    capture = []
    tiny_models.visual_tokens(model).register_forward_hook(lambda mod, inp, out: capture.append(out))
    kernel = model.model.visual.patch_embed.proj.weight  # [D, C, T=2, p, p]
    grads = {}
    for native in (0.0, 1.0):
        model.zero_grad()
        tower_phase.tower_step(model, proc, head, capture, random.Random(1), 8, native_fraction=native).backward()
        grads[native] = kernel.grad.clone()
    assert torch.allclose(grads[0.0][:, :, 0], grads[0.0][:, :, 1], atol=1e-6)
    diff = (grads[1.0][:, :, 0] - grads[1.0][:, :, 1]).norm() / grads[1.0].norm()
    assert diff > 0.05


def test_native_tokens_are_one_grid_per_temporal_patch_in_frame_order():
    """Patch 1 of a video whose frames 2, 3 are a still scene gives the grid that scene gives as an image
    (an image is two copies of itself), whatever frames 0, 1 hold."""
    model, proc = _qwen()
    capture = []
    tiny_models.visual_tokens(model).register_forward_hook(lambda mod, inp, out: capture.append(out))
    frames = _four_frames()
    with torch.no_grad():
        native = tower_phase.native_tokens(model, proc, capture, [frames])
        still = tower_phase.tower_tokens(model, proc, capture, [frames[2]])
    assert native.shape == (2, GRID * GRID, still.shape[-1])
    torch.testing.assert_close(native[1], still[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(native[0], still[0], atol=1e-2)
    groups = native_video.temporal_groups(frames)
    loss = aux_loss(aux_logits(torch.nn.Linear(still.shape[-1], sum(N_CLASSES)), native, 2),
                    cell_targets(groups))
    assert torch.isfinite(loss)


def test_a_short_native_run_logs_native_accuracy_and_losses(tmp_path):
    args = ["--family", "qwen2_vl", "--out", str(tmp_path), "--steps", "1", "--batch", "2", "--video-batch", "2",
            "--video-from", "0", "--curriculum", "0", "--eval-n", "4", "--threads", "1", "--tower-steps", "1",
            "--native-fraction", "1", "--frame-weight", "1", "--look-weight", "1", "--novelty-weight", "1",
            "--visual-share-weight", "1"]
    train_tiny.main(args)
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert set(log[0]["object_cells_native"]) == {"colour", "shape", "centre", "row", "col"}
    assert "video_native" in log[1]["held_out"] and "native_lm" in log[1] and "video_lm" not in log[1]
    assert "native_visual_share" in log[1] and "native_look" in log[1]
    results = heldout.measure(str(tmp_path), 0, 4, video_mode="native")
    assert list(results) == ["video native"] and results["video native"]["all"]["n"] == 4


def test_native_video_on_llava_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="native video needs a Qwen2-VL"):
        train_tiny.main(["--family", "llava", "--out", str(tmp_path / "run"), "--native-fraction", "0.5"])
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.build_llava(tok)
    model.save_pretrained(tmp_path / "llava")
    proc.save_pretrained(tmp_path / "llava")
    with pytest.raises(SystemExit, match="--video-mode native"):
        heldout.measure(str(tmp_path / "llava"), 0, 4, video_mode="native")

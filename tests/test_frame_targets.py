"""train_tiny --frame-weight: each video frame's last visual token tells whether the frame shows a new
object, and a distinct answer spreads its last layer's attention 1/frames over those tokens (a fixed
denominator). Targets are checked against hand-made videos, losses against their formulas."""
import random

import pytest
import torch

from tokensieve.eval.shapeworld import objectives, tiny_models, train_tiny, video_targets, world
from tokensieve.testing import make_tokenizer

CIRCLE = world.Obj("circle", "red", "small", 6.5 / 8, 1.5 / 8, uid=0)  # cell (1, 6)
SQUARE = world.Obj("square", "blue", "big", 4 / 8, 4 / 8, uid=1)  # cells (3, 3), (3, 4), (4, 3), (4, 4)


def _video():
    """A red circle in frames 0-4, a big blue square from frame 3 to the end."""
    return [world.Scene(([CIRCLE] if f <= 4 else []) + ([SQUARE] if f >= 3 else []), size=tiny_models.IMAGE,
                        background_seed=1) for f in range(tiny_models.VIDEO_FRAMES)]


def _setup(family="llava"):
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS[family](tok)
    return tok, model, proc, model.config.get_text_config().eos_token_id


def _slots(tok, proc, ids):
    return (ids == tok.convert_tokens_to_ids(proc.image_token)).nonzero().flatten().reshape(-1, 64)


@pytest.mark.parametrize("family", sorted(tiny_models.BUILDERS))
def test_frame_targets_mark_the_frames_with_a_new_object_at_their_last_token(family):
    """A still image (row 0: no frame targets) then the video (row 1, left-padded): frames 0 and 3 show a
    new object. Frame 0's last token should look at the circle's token, frame 3's at the square's four
    (1/4 each), every other frame's at the row's first token (the sink)."""
    tok, model, proc, eos = _setup(family)
    still = world.Scene([CIRCLE], size=tiny_models.IMAGE, background_seed=2)
    examples = [{"scenes": [still], "qas": [world.QA("how many circles are there ?", "1", "count")]},
                {"scenes": _video(), "qas": [world.QA("how many distinct objects appeared ?", "2", "distinct")]}]
    batch = train_tiny.collate(proc, examples, eos)
    ids, frames = batch["input_ids"][1], batch["frames"]
    slots = _slots(tok, proc, ids)
    assert frames.rows.tolist() == [1] * 8
    assert frames.pos.tolist() == slots[:, 63].tolist()
    assert frames.new.tolist() == [1, 0, 0, 1, 0, 0, 0, 0]
    sink = int((ids != tok.pad_token_id).nonzero()[0])
    expected = torch.zeros(8, ids.numel())
    expected[0, slots[0, 1 * 8 + 6]] = 1.0
    for cell in (27, 28, 35, 36):
        expected[3, slots[3, cell]] = 0.25
    for f in (1, 2, 4, 5, 6, 7):
        expected[f, sink] = 1.0
    assert torch.allclose(frames.share, expected)
    only_still = train_tiny.collate(proc, examples[:1], eos)
    assert only_still["frames"] is None


def test_distinct_frames_spreads_a_distinct_answer_over_the_frames_last_tokens():
    """With distinct_frames an open distinct turn's ``frames`` target is 1/8 on each frame's last visual
    token; a multiple-choice distinct turn (its last layer looks at the right option) and other types get
    none, and nothing does without the option."""
    tok, model, proc, eos = _setup()
    distinct = world.QA("how many distinct objects appeared ?", "2", "distinct", refs=(0, 1))
    ever = world.QA("was there ever a red circle ?", "yes", "ever", refs=(0,))
    choice = world.multiple_choice(distinct, random.Random(0))
    examples = [{"scenes": _video(), "qas": [distinct, ever]}, {"scenes": _video(), "qas": [choice]}]
    options = objectives.TargetOptions(distinct_readout=True, distinct_frames=True)
    batch = train_tiny.collate(proc, examples, eos, options=options)
    ids, g = batch["input_ids"], batch["ground"]
    expected = torch.zeros(ids.shape[1])
    expected[_slots(tok, proc, ids[0])[:, 63]] = 1 / 8
    rows = g.rows.tolist()
    assert len(rows) == 3  # distinct, ever (grounded), the multiple-choice distinct
    assert torch.allclose(g.frames[0], expected)
    assert not g.frames[1:].any()
    plain = train_tiny.collate(proc, examples, eos, options=objectives.TargetOptions(distinct_readout=True))
    assert not plain["ground"].frames.any()


def test_frame_new_map_puts_each_frames_bit_at_its_token_for_the_novelty_loss():
    frames = video_targets.FrameTargets(torch.tensor([0, 0, 1]), torch.tensor([2, 5, 3]), torch.tensor([1, 0, 1]),
                                     torch.zeros(3, 6))
    expected = torch.full((2, 6), -100)
    expected[0, 2], expected[0, 5], expected[1, 3] = 1, 0, 1
    assert torch.equal(train_tiny.frame_new_map(frames, (2, 6)), expected)


def test_frame_weight_adds_the_three_frame_losses_to_the_training_loss():
    """train_step with frame_weight w: the loss grows by exactly w * (frame_look + frame_new + frame_count),
    each reported, on a random tiny model (eager attention: the losses read attention probabilities)."""
    tok, model, proc, eos = _setup()
    model.set_attn_implementation("eager")
    model.eval()  # (no dropout: two forwards agree)
    capture = []
    tiny_models.visual_tokens(model).register_forward_hook(lambda mod, inp, out: capture.append(out))
    hidden = model.config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, sum(objectives.N_CLASSES))
    frame_reader = torch.nn.Linear(hidden, 2)
    video = world.random_video(random.Random(4), n_frames=tiny_models.VIDEO_FRAMES, size=tiny_models.IMAGE)
    qas = [qa for qa in world.video_questions(video, random.Random(4)) if qa.type == "distinct"]
    examples = [{"scenes": video.frames, "qas": qas}]
    options = objectives.TargetOptions(distinct_readout=True, distinct_frames=True)

    def run(weight):
        batch = train_tiny.collate(proc, examples, eos, options=options)
        with torch.no_grad():
            return train_tiny.train_step(model, head, capture, batch, 0.0, frame_reader=frame_reader,
                                         frame_weight=weight)

    base, _ = run(0.0)
    loss, info = run(2.0)
    assert {"frame_look", "frame_new", "frame_count"} <= set(info)
    assert all(info[k] > 0 for k in ("frame_look", "frame_new", "frame_count"))
    extra = 2.0 * (info["frame_look"] + info["frame_new"] + info["frame_count"])
    assert loss.item() - base.item() == pytest.approx(extra, rel=1e-4)


def test_negative_frame_weight_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--frame-weight and --look-weight must be >= 0"):
        train_tiny.main(["--out", str(tmp_path), "--frame-weight", "-1"])


def test_count_after_frames_reads_a_distinct_count_only_after_the_frame_count_layer():
    """readout_layers (2, 3) with count_after_frames: after layer 2 the open distinct turn has no count
    target (the frames are counted in layer 3), after layer 3 it has; other targets are unchanged.
    Reference: objectives.readout_loss (checked against its formula elsewhere) on hand-masked targets."""
    tok, model, proc, eos = _setup()
    model.set_attn_implementation("eager")
    model.eval()
    capture = []
    tiny_models.visual_tokens(model).register_forward_hook(lambda mod, inp, out: capture.append(out))
    hidden = model.config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, sum(objectives.N_CLASSES))
    reader = torch.nn.Linear(hidden, sum(objectives.N_READOUT))
    distinct = world.QA("how many distinct objects appeared ?", "2", "distinct", refs=(0, 1))
    order = world.QA("which shape came first , circle or square ?", "circle", "order", refs=(0, 1))
    examples = [{"scenes": _video(), "qas": [distinct, order]}]
    options = objectives.TargetOptions(distinct_readout=True, order_first=True, distinct_frames=True)

    def run(after):
        batch = train_tiny.collate(proc, examples, eos, options=options)
        g = batch["ground"]
        with torch.no_grad():
            _, info = train_tiny.train_step(model, head, capture, batch, 0.0, reader=reader, readout_weight=1.0,
                                            readout_layers=(2, 3), count_after_frames=after)
        return info["readout"], g

    both, g = run(False)
    after, _ = run(True)
    batch = train_tiny.collate(proc, examples, eos, options=options)
    for k in (*train_tiny.TARGET_KEYS, "labels"):
        batch.pop(k)
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
        masked = g.attrs.clone()
        assert g.frames[0].any() and masked[0, -1] == 2  # the distinct turn is frame-counted, its count is 2
        masked[0, -1] = -100
        expected = (objectives.readout_loss(reader, states, g.rows, g.pos, masked, 2)
                    + objectives.readout_loss(reader, states, g.rows, g.pos, g.attrs, 3))
        plain = sum(objectives.readout_loss(reader, states, g.rows, g.pos, g.attrs, layer) for layer in (2, 3))
    assert after == pytest.approx(expected.item(), rel=1e-5)
    assert both == pytest.approx(plain.item(), rel=1e-5) and both != pytest.approx(after, rel=1e-3)

"""train_tiny --look-weight: each video object token's attention in one LM layer looks back at its
object's tokens in the last earlier frame that showed it, or at the sink (the first token) in the
object's first frame. Targets are checked against a hand-made video, the loss against its formula."""
import math
import random

import pytest
import torch

from tokensieve.eval.shapeworld import objectives, tiny_models, train_tiny, world
from tokensieve.testing import make_tokenizer


def _circle(col):
    return world.Obj("circle", "red", "small", (col + 0.5) / 8, 1.5 / 8, uid=0)  # cell (1, col)


SQUARE = world.Obj("square", "blue", "big", 4 / 8, 4 / 8, uid=1)  # cells (3, 3), (3, 4), (4, 3), (4, 4)


def _video():
    """A red circle at cell (1, 6) in frames 0-1 that steps to (1, 5) in frames 2-4 and is gone after;
    a big blue square from frame 3 to the end."""
    return [world.Scene(([_circle(6 if f < 2 else 5)] if f <= 4 else []) + ([SQUARE] if f >= 3 else []),
                        size=tiny_models.IMAGE, background_seed=1) for f in range(tiny_models.VIDEO_FRAMES)]


def _setup(family="llava"):
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS[family](tok)
    return tok, model, proc, model.config.get_text_config().eos_token_id


@pytest.mark.parametrize("family", sorted(tiny_models.BUILDERS))
def test_look_targets_point_each_object_token_at_its_previous_frame_or_the_sink(family):
    """Row 0 is a still image (no targets), row 1 the video. The circle's token looks at
    the sink in frame 0, then at the circle's cell of the frame before (cell (1, 6) from frames 1 and 2,
    (1, 5) from frames 3 and 4: where it was, not where it is); each of the square's four tokens looks
    at the sink in frame 3, then 1/4 on each of its four tokens of the frame before."""
    tok, model, proc, eos = _setup(family)
    still = world.Scene([_circle(6)], size=tiny_models.IMAGE, background_seed=2)
    examples = [{"scenes": [still], "qas": [world.QA("how many circles are there ?", "1", "count")]},
                {"scenes": _video(), "qas": [world.QA("how many distinct objects appeared ?", "2", "distinct")]}]
    batch = train_tiny.collate(proc, examples, eos)
    ids, look = batch["input_ids"][1], batch["look"]
    slots = (ids == tok.convert_tokens_to_ids(proc.image_token)).nonzero().flatten().reshape(8, 64)
    sink = int((ids != tok.pad_token_id).nonzero()[0])
    expected = {}  # position -> target distribution as {position: weight}
    circle_cell = [14, 14, 13, 13, 13]
    for f in range(5):
        expected[int(slots[f, circle_cell[f]])] = {sink: 1.0} if f == 0 else {int(slots[f - 1, circle_cell[f - 1]]): 1.0}
    square_cells = (27, 28, 35, 36)
    for f in range(3, 8):
        for c in square_cells:
            expected[int(slots[f, c])] = {sink: 1.0} if f == 3 else {int(slots[f - 1, k]): 0.25 for k in square_cells}
    assert look.rows.tolist() == [1] * len(expected)
    assert sorted(look.pos.tolist()) == sorted(expected)
    for p, share in zip(look.pos.tolist(), look.share):
        target = torch.zeros(ids.numel())
        for k, w in expected[p].items():
            target[k] = w
        assert torch.allclose(share, target), p
    assert train_tiny.collate(proc, examples[:1], eos)["look"] is None


def test_look_targets_with_novelty_centres_keep_one_token_per_object():
    tok, model, proc, eos = _setup()
    examples = [{"scenes": _video(), "qas": [world.QA("how many distinct objects appeared ?", "2", "distinct")]}]
    opts = objectives.TargetOptions(novelty_centres=True)
    batch = train_tiny.collate(proc, examples, eos, options=opts)
    novelty = batch["novelty"][0]
    assert sorted(batch["look"].pos.tolist()) == (novelty >= 0).nonzero().flatten().tolist()
    assert len(batch["look"].pos) == 5 + 5  # the circle in frames 0-4, the square's centre in frames 3-7


def test_share_loss_over_chosen_heads_is_their_mean_kl_only():
    torch.manual_seed(0)
    attentions = [torch.softmax(torch.randn(2, 4, 5, 5), -1) for _ in range(3)]  # per layer [B, H, L, L]
    share = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    rows, pos = torch.tensor([0, 1]), torch.tensor([3, 2])
    loss = objectives.share_loss(attentions, rows, pos, share, layer=1, heads=(1, 3))
    expected = 0.0
    for t in range(2):
        for h in (1, 3):
            q = attentions[1][rows[t], h, pos[t]]
            expected += sum(p * math.log(p / q[k].item()) for k, p in enumerate(share[t].tolist()) if p) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    changed = [a.clone() for a in attentions]
    changed[1][:, (0, 2)] = torch.softmax(torch.randn(2, 2, 5, 5), -1)  # the free heads do not count
    assert objectives.share_loss(changed, rows, pos, share, layer=1, heads=(1, 3)).item() == pytest.approx(loss.item())


def test_look_weight_adds_the_look_back_loss_to_the_training_loss():
    """train_step with look_weight w on a random tiny model: the loss grows by exactly w * look, and look is
    the KL of layer 1's head 2 computed here from the model's own eager attention probabilities."""
    tok, model, proc, eos = _setup("qwen2_vl")
    model.set_attn_implementation("eager")
    model.eval()
    capture = []
    tiny_models.visual_tokens(model).register_forward_hook(lambda mod, inp, out: capture.append(out))
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, sum(objectives.N_CLASSES))
    video = world.random_video(random.Random(5), n_frames=tiny_models.VIDEO_FRAMES, size=tiny_models.IMAGE)
    examples = [{"scenes": video.frames, "qas": world.video_questions(video, random.Random(5))[:1]}]

    def run(weight):
        batch = train_tiny.collate(proc, examples, eos)
        with torch.no_grad():
            return train_tiny.train_step(model, head, capture, batch, 0.0, look_weight=weight, look_layer=1,
                                         look_heads=(2,))

    base, _ = run(0.0)
    loss, info = run(3.0)
    assert loss.item() - base.item() == pytest.approx(3.0 * info["look"], rel=1e-4)
    batch = train_tiny.collate(proc, examples, eos)
    look = batch["look"]
    for k in (*train_tiny.TARGET_KEYS, "labels"):
        batch.pop(k)
    with torch.no_grad():
        probs = model(**batch, output_attentions=True).attentions[1][0, 2]  # [L, L]
    kl = [sum(p * math.log(p / probs[q, k].item()) for k, p in enumerate(s.tolist()) if p)
          for q, s in zip(look.pos.tolist(), look.share)]
    assert info["look"] == pytest.approx(sum(kl) / len(kl), rel=1e-4)


@pytest.mark.parametrize("flags, message", [(["--look-weight", "-1"], "--look-weight must be >= 0"),
                                            (["--look-layer", "4"], "--look-layer must be an LM layer"),
                                            (["--look-heads", "0", "4"], "--look-heads heads 0-3")])
def test_bad_look_flags_are_one_clear_error(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_tiny.main(["--out", str(tmp_path), *flags])

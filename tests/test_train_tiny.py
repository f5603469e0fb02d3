"""The tiny-model training script: runs, saves a checkpoint that tokensieve loads, covers the world's words,
and builds its batches in exactly the engine's prompt format."""
import json
import math
import random

import pytest
import torch

import tokensieve
from tokensieve.eval.shapeworld import objectives, tiny_models, train_tiny, world
from tokensieve.testing import make_tokenizer


def test_vocabulary_covers_the_world():
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    rng = random.Random(123)  # a different seed from the one the vocabulary was collected with
    for _ in range(200):
        for qa in world.image_questions(world.random_scene(rng), rng):
            qa = world.multiple_choice(qa, rng)
            assert tok.unk_token_id not in tok(qa.question + " " + qa.answer)["input_ids"], qa.question
    for _ in range(50):
        for qa in world.video_questions(world.random_video(rng, n_frames=8), rng):
            assert tok.unk_token_id not in tok(qa.question + " " + qa.answer)["input_ids"], qa.question


@pytest.mark.parametrize("family", sorted(tiny_models.BUILDERS))
def test_training_batches_match_the_engine_prompt(family, tmp_path):
    """The first turn of a training conversation is token for token what the engine feeds the model,
    and the labels are exactly the answers (plus the eos after each)."""
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS[family](tok)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    ex = train_tiny.sample_examples(random.Random(0), 1, video=False, turns=3)[0]
    eos = model.config.get_text_config().eos_token_id
    batch = train_tiny.collate(proc, [ex], eos)
    with tokensieve.load(str(tmp_path)) as engine:
        ref = engine.prepare(ex["qas"][0].question, images=[world.render(s) for s in ex["scenes"]])
    n = ref["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n], ref["input_ids"][0])
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    expected = [t for qa in ex["qas"] for t in (tok.convert_tokens_to_ids(qa.answer), eos)]
    assert labelled.tolist() == expected
    assert batch["cells"].shape == (1, tiny_models.GRID ** 2, len(objectives.TARGETS))


@pytest.mark.parametrize("family", sorted(tiny_models.BUILDERS))
def test_grounding_targets_point_at_the_question_objects_tokens(family):
    """The grounding mask of a turn covers exactly the visual tokens of the cells its object fills,
    and its position is the token right before the answer."""
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS[family](tok)
    # small red circle in cell (row 1, col 6); big blue square over cells rows 4-5, cols 2-3
    scene = world.Scene([world.Obj("circle", "red", "small", 6.5 / 8, 1.5 / 8, uid=0),
                         world.Obj("square", "blue", "big", 3 / 8, 5 / 8, uid=1)], size=tiny_models.IMAGE)
    qas = [world.QA("what colour is the circle ?", "red", "colour", refs=(0,)),
           world.QA("how many green objects are there ?", "0", "count"),
           world.QA("what shape is the blue object ?", "square", "shape", refs=(1,))]
    batch = train_tiny.collate(proc, [{"scenes": [scene], "qas": qas}], model.config.get_text_config().eos_token_id)
    rows, pos, mask, attrs, grounded, option, letters, share, named, words, frames = batch["ground"]
    ids = batch["input_ids"][0]
    image = (ids == tok.convert_tokens_to_ids(proc.image_token)).nonzero().flatten()  # 64 slots, raster order
    assert rows.tolist() == [0, 0]  # the count question refers to no object: no row
    answers = (batch["labels"][0] != -100).nonzero().flatten()[::2]  # answer tokens (each followed by eos)
    assert pos.tolist() == [answers[0].item() - 1, answers[2].item() - 1]
    assert mask[0].nonzero().flatten().tolist() == [image[1 * 8 + 6].item()]
    assert mask[1].nonzero().flatten().tolist() == sorted(image[[4 * 8 + 2, 4 * 8 + 3, 5 * 8 + 2, 5 * 8 + 3]].tolist())
    # readout targets: red circle (colour 0, shape 0) on the right, at the top; blue square (2, 1) left, bottom
    assert list(world.COLOURS)[:3] == ["red", "green", "blue"] and world.SHAPES[:2] == ("circle", "square")
    assert attrs.tolist() == [[0, 0, 1, 0, -100], [2, 1, 0, 1, -100]] and grounded.all() and not option.any()
    assert (letters == -100).all() and not share.any() and not frames.any()  # open questions: no letters, no shares
    assert named.tolist() == [[-100, 0], [2, -100]]  # the words the questions name: circle; blue
    name_at = {w: [i for i, t in enumerate(ids.tolist()) if t == tok.convert_tokens_to_ids(w)] for w in ("circle", "blue")}
    assert words[0].nonzero().flatten().tolist() == name_at["circle"][:1]  # turn 1's circle, not a later turn's
    assert words[1].nonzero().flatten().tolist() == name_at["blue"][-1:]
    # with count_readout the count turn (0 green objects) is read out, not grounded
    rows, pos, mask, attrs, grounded, option, letters, share, named, words, frames = train_tiny.collate(
        proc, [{"scenes": [scene], "qas": qas}], model.config.get_text_config().eos_token_id,
        options=objectives.TargetOptions(count_readout=True))["ground"]
    assert rows.tolist() == [0, 0, 0] and grounded.tolist() == [True, False, True]
    assert pos.tolist() == (answers[:3] - 1).tolist() and not mask[1].any()
    assert attrs[1].tolist() == [-100, -100, -100, -100, 0] and named[1].tolist() == [1, -100]  # green


@pytest.mark.parametrize("family", sorted(tiny_models.BUILDERS))
def test_option_mask_marks_the_right_options_word(family):
    """A multiple-choice turn marks the word after its answer letter ("B . blue" -> "blue"), never the same
    word in the question's stem; such a turn gets a row even when it refers to no object."""
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS[family](tok)
    scene = world.Scene([world.Obj("circle", "red", "small", 6.5 / 8, 1.5 / 8, uid=0)], size=tiny_models.IMAGE)
    qas = [world.QA("is the red circle on the left or right ? A . top B . right C . left D . bottom", "B", "position",
                    ["A. top", "B. right", "C. left", "D. bottom"], refs=(0,)),
           world.QA("is there a blue star ? A . yes B . no", "B", "exist", ["A. yes", "B. no"])]
    g = train_tiny.collate(proc, [{"scenes": [scene], "qas": qas}], model.config.get_text_config().eos_token_id)["ground"]
    ids = train_tiny.collate(proc, [{"scenes": [scene], "qas": qas}], 0, targets=False)["input_ids"][0]
    words = tok.convert_ids_to_tokens(ids.tolist())
    marked = [(i, words[i - 2 : i + 1]) for i in g.option.nonzero()[:, 1].tolist()]
    assert [m for _, m in marked] == [["B", ".", "right"], ["B", ".", "no"]]
    assert marked[0][0] > words.index("right")  # the option's "right", not the stem's
    assert g.grounded.tolist() == [True, False]  # the absent object: no grounding, the option still counts
    # letter targets: every option's word holds its letter's index (A=0 ... D=3), per turn
    lettered = [[(words[i - 2 : i + 1], c) for i, c in enumerate(row.tolist()) if c != -100] for row in g.letters]
    assert lettered == [[(["A", ".", "top"], 0), (["B", ".", "right"], 1), (["C", ".", "left"], 2), (["D", ".", "bottom"], 3)],
                        [(["A", ".", "yes"], 0), (["B", ".", "no"], 1)]]


def test_letter_loss_is_the_readers_cross_entropy_at_the_option_words_after_the_layer():
    torch.manual_seed(0)
    hidden = [torch.randn(2, 6, 4) for _ in range(5)]  # embeddings + 4 layers, [B, L, D]
    reader = torch.nn.Linear(4, 4)
    letters = torch.full((2, 6), -100)
    letters[0, 2], letters[0, 5], letters[1, 1] = 0, 3, 2  # turn 0 (example 1): two options; turn 1 (example 0): one
    loss = objectives.letter_loss(reader, hidden, torch.tensor([1, 0]), letters, layer=2)
    logits = reader(torch.stack([hidden[3][1, 2], hidden[3][1, 5], hidden[3][0, 1]]))  # after layer 2
    expected = -sum(torch.log_softmax(logits[i], -1)[c] for i, c in enumerate([0, 3, 2])).item() / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_grounding_loss_is_minus_log_of_the_layers_mean_head_mass():
    att = torch.full((3, 1, 2, 3, 3), 1 / 3)  # layers, B, H, L, L
    att[2, 0, 1, 2] = torch.tensor([0.1, 0.1, 0.8])  # layer 2, head 1, row 2 puts 0.8 on token 2 (head 0: 1/3)
    att[1, 0, :, 2] = torch.tensor([0.0, 0.0, 1.0])  # layer 1 is not supervised
    mask = torch.tensor([[False, False, True]])
    loss = objectives.grounding_loss(list(att), torch.tensor([0]), torch.tensor([2]), mask, layer=2)
    assert loss.item() == pytest.approx(-torch.log(torch.tensor((0.8 + 1 / 3) / 2)).item())


def test_grounding_loss_per_head_is_the_mean_of_each_heads_minus_log_mass():
    att = torch.full((3, 1, 2, 3, 3), 1 / 3)  # layers, B, H, L, L
    att[2, 0, 0, 2] = torch.tensor([0.8, 0.1, 0.1])  # head 0 looks elsewhere: 0.1 on token 2
    att[2, 0, 1, 2] = torch.tensor([0.0, 0.1, 0.9])  # head 1 finds it: 0.9
    mask = torch.tensor([[False, False, True]])
    args = list(att), torch.tensor([0]), torch.tensor([2]), mask
    assert objectives.grounding_loss(*args, per_head=True).item() == pytest.approx(-(math.log(0.1) + math.log(0.9)) / 2)
    assert objectives.grounding_loss(*args).item() == pytest.approx(-math.log(0.5))  # the heads' mean mass


@pytest.mark.parametrize("family", sorted(tiny_models.BUILDERS))
def test_position_targets_give_each_visual_token_its_raster_row_and_column(family):
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS[family](tok)
    scene = world.Scene([world.Obj("circle", "red", "small", 0.3, 0.4, uid=0)], size=tiny_models.IMAGE)
    ex = {"scenes": [scene, scene], "qas": [world.QA("was there ever a red circle ?", "yes", "ever", refs=(0,))]}
    batch = train_tiny.collate(proc, [ex], model.config.get_text_config().eos_token_id)
    ids, positions = batch["input_ids"][0], batch["positions"][0]
    image = (ids == tok.convert_tokens_to_ids(proc.image_token)).nonzero().flatten()  # 2 frames x 64, raster order
    assert image.numel() == 2 * 64
    expected = torch.full((ids.numel(), 2), -100)
    for f in range(2):
        for k in range(64):
            expected[image[f * 64 + k]] = torch.tensor([k // 8, k % 8])
    assert torch.equal(positions, expected)


def test_position_loss_is_the_readers_row_and_column_cross_entropy_after_layer_1():
    torch.manual_seed(0)
    hidden = [torch.randn(1, 3, 8) for _ in range(5)]
    reader = torch.nn.Linear(8, 2 * tiny_models.GRID)
    positions = torch.tensor([[[-100, -100], [2, 5], [-100, -100]]])
    logits = reader(hidden[2][0, 1])  # token 1 after layer 1
    row, col = logits[:8].log_softmax(-1), logits[8:].log_softmax(-1)
    expected = -(row[2] + col[5])
    assert objectives.position_loss(reader, hidden, positions).item() == pytest.approx(expected.item(), rel=1e-5)


def test_word_loss_is_zero_from_one_heads_worth_of_mass_on_the_named_words():
    att = torch.full((3, 1, 2, 3, 3), 1 / 3)  # layers, B, H, L, L
    att[1, 0, 0, 2] = torch.tensor([0.9, 0.1, 0.0])  # layer 1: head 0 puts 0.1 on word token 1, head 1 1/3
    words = torch.tensor([[False, True, False]])
    args = list(att), torch.tensor([0]), torch.tensor([2]), words
    mean = (0.1 + 1 / 3) / 2
    assert objectives.word_loss(*args).item() == pytest.approx(-math.log(mean) - math.log(2))
    att[1, 0, 0, 2] = torch.tensor([0.0, 1.0, 0.0])  # head 0 all on the word: mean 2/3 >= 1/2
    assert objectives.word_loss(list(att), *args[1:]).item() == 0.0


def test_named_words_are_the_stems_one_colour_and_one_shape():
    assert objectives.named_words("is there a white star ?") == [6, 3]  # COLOURS[6], SHAPES[3]
    assert list(world.COLOURS)[6] == "white" and world.SHAPES[3] == "star"
    assert objectives.named_words("which shape came first , circle or cross ?") == [-100, -100]  # two shapes
    assert objectives.named_words("what colour is the circle ? A . red B . blue") == [-100, 0]  # not the options


def test_query_loss_is_the_readers_cross_entropy_at_the_answer_token_after_layer_1():
    torch.manual_seed(0)
    hidden = [torch.randn(2, 5, 8) for _ in range(5)]  # embeddings + 4 layers
    reader = torch.nn.Linear(8, sum(objectives.N_NAMED))
    rows, pos = torch.tensor([0, 1]), torch.tensor([3, 4])
    named = torch.tensor([[2, -100], [5, 1]])
    logits = reader(torch.stack([hidden[2][0, 3], hidden[2][1, 4]]))  # after layer 1 = hidden_states[2]
    colour, shape = logits[:, :len(world.COLOURS)], logits[:, len(world.COLOURS):]
    expected = (-(colour.log_softmax(-1)[0, 2] + colour.log_softmax(-1)[1, 5]) / 2 - shape.log_softmax(-1)[1, 1])
    assert objectives.query_loss(reader, hidden, rows, pos, named).item() == pytest.approx(expected.item(), rel=1e-5)


def test_readout_loss_is_the_readers_cross_entropy_at_the_answer_token_after_the_layer():
    torch.manual_seed(0)
    hidden = [torch.randn(2, 5, 4) for _ in range(5)]  # embeddings + 4 layers, [B, L, D]
    reader = torch.nn.Linear(4, sum(objectives.N_READOUT))
    rows, pos = torch.tensor([1, 0]), torch.tensor([3, 2])
    attrs = torch.tensor([[1, 2, 0, 1, -100], [-100, -100, -100, -100, 3]])  # turn 2: a count of 3
    loss = objectives.readout_loss(reader, hidden, rows, pos, attrs, layer=2)
    logits = reader(torch.stack([hidden[3][1, 3], hidden[3][0, 2]]))  # after layer 2 = hidden_states[3]
    expected, start = 0.0, 0
    for n, col in zip(objectives.N_READOUT, attrs.T.tolist()):  # each target: mean over the turns that have one
        terms = [-torch.log_softmax(logits[t, start:start + n], -1)[c].item() for t, c in enumerate(col) if c >= 0]
        expected += sum(terms) / len(terms)
        start += n
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def _weights(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("family", sorted(tiny_models.BUILDERS))
def test_init_from_continues_a_checkpoint_and_train_projector_trains_only_the_projector(family, tmp_path):
    """--init-from starts from every saved weight (a step at learning rate 0 saves them unchanged);
    with --freeze-tower --train-projector one step (every loss on) changes the projector and the LM,
    never the tower."""
    tok = make_tokenizer(tuple(train_tiny.vocabulary()))
    model, proc = tiny_models.BUILDERS[family](tok)
    model.save_pretrained(tmp_path / "src")
    proc.save_pretrained(tmp_path / "src")
    common = ["--family", family, "--init-from", str(tmp_path / "src"), "--steps", "1", "--batch", "2",
              "--video-batch", "0", "--curriculum", "0", "--eval-n", "2", "--threads", "1", "--ground-weight", "0"]
    train_tiny.main(common + ["--out", str(tmp_path / "same"), "--lr", "0"])
    src, same = _weights(tmp_path / "src"), _weights(tmp_path / "same")
    assert src.keys() == same.keys() and all(torch.equal(src[k], same[k]) for k in src)

    every_loss = ["--readout-weight", "1", "--option-weight", "1", "--letter-weight", "1", "--count-readout"]
    train_tiny.main(common + ["--out", str(tmp_path / "step"), "--lr", "1e-2", "--freeze-tower", "--train-projector",
                              *every_loss])
    step = _weights(tmp_path / "step")
    changed = {k for k in src if not torch.equal(src[k], step[k])}
    projector = {n for n, _ in tiny_models.visual_tokens(model).named_parameters()}
    is_projector = lambda k: any(k.endswith(n) and ("projector" in k or "merger" in k) for n in projector)
    tower = {k for k in src if ("vision_tower" in k or "visual" in k) and not is_projector(k)}
    assert tower and not tower & changed  # the frozen tower never moves
    assert any(is_projector(k) for k in changed)  # the projector / merger trains
    assert any("language_model" in k or "lm_head" in k for k in changed)  # so does the LM


def test_stop_at_ends_a_longer_schedule_early(tmp_path):
    """--steps 4 --stop-at 2: the run ends after step 2, evaluated (the log's one record) and saved; a stop past
    --steps is one clear error."""
    common = ["--steps", "4", "--batch", "2", "--video-batch", "0", "--curriculum", "0", "--eval-n", "2",
              "--threads", "1", "--ground-weight", "0", "--tower-steps", "0", "--eval-every", "100"]
    train_tiny.main(common + ["--out", str(tmp_path / "a"), "--stop-at", "2"])
    log = [json.loads(line) for line in open(tmp_path / "a" / "train_log.jsonl")]
    assert [r["step"] for r in log] == [2]
    assert (tmp_path / "a" / "model.safetensors").exists()
    with pytest.raises(SystemExit, match="--stop-at must be a step 1-4 of --steps"):
        train_tiny.main(common + ["--out", str(tmp_path / "b"), "--stop-at", "5"])


def test_init_from_and_tower_from_together_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not both"):
        train_tiny.main(["--out", str(tmp_path), "--init-from", "a", "--tower-from", "b"])


def test_readout_layer_outside_the_lm_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--readout-layers must be LM layers 0-3"):
        train_tiny.main(["--out", str(tmp_path), "--readout-layers", "2", "4"])


def test_negative_distinct_sink_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--distinct-sink and --count-sink must be >= 0"):
        train_tiny.main(["--out", str(tmp_path), "--distinct-sink", "-1"])


def test_width_rope_scale_for_llava_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--width-rope-scale is a positive factor for --family qwen2_vl"):
        train_tiny.main(["--out", str(tmp_path), "--family", "llava", "--width-rope-scale", "21.5"])


def test_distinct_readout_reads_out_the_number_of_objects_in_the_video_instead_of_grounding():
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS["llava"](tok)
    video = world.random_video(random.Random(3), n_frames=tiny_models.VIDEO_FRAMES, size=tiny_models.IMAGE)
    distinct = [qa for qa in world.video_questions(video, random.Random(3)) if qa.type == "distinct"]
    example = [{"scenes": video.frames, "qas": distinct}]
    n_objects = len({o.uid for frame in video.frames for o in frame.objects})
    eos = model.config.get_text_config().eos_token_id
    plain = train_tiny.collate(proc, example, eos)["ground"]
    assert plain.grounded.tolist() == [True] and (plain.attrs == -100).all()  # grounded on every frame
    read = train_tiny.collate(proc, example, eos, options=objectives.TargetOptions(distinct_readout=True))["ground"]
    assert read.grounded.tolist() == [False]  # read out, not grounded
    assert read.attrs[0].tolist() == [-100] * (len(objectives.READOUT) - 1) + [n_objects]


def test_order_first_grounds_on_the_earlier_object_before_the_later_one_shows():
    """Hand-made 8-frame video: a red circle from frame 0, a blue square from frame 3 (both to the end).
    "which shape came first ?" looks at the circle's tokens in frames 0-2 only, and reads out its colour
    and shape; without order_first it looks at both objects in every frame."""
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS["llava"](tok)
    circle = world.Obj("circle", "red", "small", 6.5 / 8, 1.5 / 8, uid=0)  # cell (1, 6)
    square = world.Obj("square", "blue", "small", 2.5 / 8, 5.5 / 8, uid=1)  # cell (5, 2)
    frames = [world.Scene([circle] + ([square] if f >= 3 else []), size=tiny_models.IMAGE, background_seed=1)
              for f in range(tiny_models.VIDEO_FRAMES)]
    qa = world.QA("which shape came first , square or circle ?", "circle", "order", refs=(0, 1))
    eos = model.config.get_text_config().eos_token_id
    batch = train_tiny.collate(proc, [{"scenes": frames, "qas": [qa]}], eos,
                               options=objectives.TargetOptions(order_first=True))
    ids = batch["input_ids"][0]
    slots = (ids == tok.convert_tokens_to_ids(proc.image_token)).nonzero().flatten().reshape(len(frames), 64)
    g = batch["ground"]
    assert g.grounded.tolist() == [True]
    assert g.mask[0].nonzero().flatten().tolist() == [slots[f, 1 * 8 + 6].item() for f in range(3)]
    red, circle_shape = list(world.COLOURS).index("red"), world.SHAPES.index("circle")
    assert g.attrs[0].tolist() == [red, circle_shape, -100, -100, -100]
    plain = train_tiny.collate(proc, [{"scenes": frames, "qas": [qa]}], eos)["ground"]
    expected = sorted([slots[f, 1 * 8 + 6].item() for f in range(8)] + [slots[f, 5 * 8 + 2].item() for f in range(3, 8)])
    assert plain.mask[0].nonzero().flatten().tolist() == expected
    assert (plain.attrs == -100).all()


def test_novelty_targets_mark_each_video_object_new_in_its_first_frame_only():
    """Hand-made 8-frame video: a red circle in frames 0-4, a blue square from frame 3 to the end;
    in the same batch a still image of the circle. The circle's token is new (1) in frame 0 and seen (0)
    in frames 1-4; the square's is new in frame 3 and seen in 4-7; every other token, and every token
    of the still image, is -100."""
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS["llava"](tok)
    circle = world.Obj("circle", "red", "small", 6.5 / 8, 1.5 / 8, uid=0)  # cell (1, 6)
    square = world.Obj("square", "blue", "small", 2.5 / 8, 5.5 / 8, uid=1)  # cell (5, 2)
    frames = [world.Scene(([circle] if f <= 4 else []) + ([square] if f >= 3 else []), size=tiny_models.IMAGE,
                          background_seed=1) for f in range(tiny_models.VIDEO_FRAMES)]
    still = world.Scene([circle], size=tiny_models.IMAGE, background_seed=2)
    qa = world.QA("how many distinct objects appeared ?", "2", "distinct", refs=(0, 1))
    examples = [{"scenes": frames, "qas": [qa]}, {"scenes": [still], "qas": [world.QA("how many circles are there ?", "1", "count")]}]
    batch = train_tiny.collate(proc, examples, model.config.get_text_config().eos_token_id)
    ids, novelty = batch["input_ids"][0], batch["novelty"]
    slots = (ids == tok.convert_tokens_to_ids(proc.image_token)).nonzero().flatten().reshape(len(frames), 64)
    expected = torch.full_like(novelty[0], -100)
    for f in range(5):
        expected[slots[f, 1 * 8 + 6]] = int(f == 0)
    for f in range(3, 8):
        expected[slots[f, 5 * 8 + 2]] = int(f == 3)
    assert novelty[0].tolist() == expected.tolist()
    assert (novelty[1] == -100).all()


def test_novelty_loss_is_the_readers_cross_entropy_at_the_marked_tokens_after_the_layer():
    torch.manual_seed(0)
    hidden = [torch.randn(2, 6, 4) for _ in range(5)]  # embeddings + 4 layers, [B, L, D]
    reader = torch.nn.Linear(4, 2)
    novelty = torch.full((2, 6), -100)
    novelty[0, 1], novelty[1, 4], novelty[1, 5] = 1, 0, 1
    loss = objectives.novelty_loss(reader, hidden, novelty, layer=1)
    logits = reader(torch.stack([hidden[2][0, 1], hidden[2][1, 4], hidden[2][1, 5]]))  # after layer 1
    expected = -sum(torch.log_softmax(logits[i], -1)[c] for i, c in enumerate([1, 0, 1])).item() / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_novelty_centres_mark_one_token_per_object_whatever_its_size():
    """A big blue square (2 x 2 cells, centre on the corner of cells (3, 3)-(4, 4)) in every frame and a
    small red circle (cell (1, 6)) from frame 2: with novelty_centres only the token of each centre has
    a target (the square's: cell (4, 4)), 1 in the object's first frame and 0 after; without it all
    four of the square's tokens have one."""
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS["llava"](tok)
    square = world.Obj("square", "blue", "big", 4 / 8, 4 / 8, uid=0)
    circle = world.Obj("circle", "red", "small", 6.5 / 8, 1.5 / 8, uid=1)
    frames = [world.Scene([square] + ([circle] if f >= 2 else []), size=tiny_models.IMAGE, background_seed=1)
              for f in range(tiny_models.VIDEO_FRAMES)]
    example = [{"scenes": frames, "qas": [world.QA("how many distinct objects appeared ?", "2", "distinct", refs=(0, 1))]}]
    eos = model.config.get_text_config().eos_token_id
    batch = train_tiny.collate(proc, example, eos, options=objectives.TargetOptions(novelty_centres=True))
    ids, novelty = batch["input_ids"][0], batch["novelty"][0]
    slots = (ids == tok.convert_tokens_to_ids(proc.image_token)).nonzero().flatten().reshape(len(frames), 64)
    expected = torch.full_like(novelty, -100)
    for f in range(8):
        expected[slots[f, 4 * 8 + 4]] = int(f == 0)
        if f >= 2:
            expected[slots[f, 1 * 8 + 6]] = int(f == 2)
    assert novelty.tolist() == expected.tolist()
    every_cell = train_tiny.collate(proc, example, eos)["novelty"][0]
    assert [(every_cell[slots[0, 8 * r + c]]).item() for r in (3, 4) for c in (3, 4)] == [1, 1, 1, 1]


def test_distinct_sink_shares_weight_on_the_first_token_and_one_on_each_objects_first_centre():
    """Two videos of different lengths in one batch (left padding): video 0 has a red circle (cell (1, 6))
    in frames 0-4 and a big blue square (centre cell (4, 4)) from frame 3; with distinct_sink=2 its
    distinct turn's share is 2/4 on its first token, 1/4 on the circle's token of frame 0 and 1/4 on the
    square's centre token of frame 3; turns of other types get no share, nor does anything without the option."""
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS["llava"](tok)
    circle = world.Obj("circle", "red", "small", 6.5 / 8, 1.5 / 8, uid=0)
    square = world.Obj("square", "blue", "big", 4 / 8, 4 / 8, uid=1)
    frames = [world.Scene(([circle] if f <= 4 else []) + ([square] if f >= 3 else []), size=tiny_models.IMAGE,
                          background_seed=1) for f in range(tiny_models.VIDEO_FRAMES)]
    distinct = world.QA("how many distinct objects appeared ?", "2", "distinct", refs=(0, 1))
    ever = world.QA("was there ever a red circle ?", "yes", "ever", refs=(0,))
    examples = [{"scenes": frames, "qas": [distinct]},
                {"scenes": frames, "qas": [ever, world.QA("which shape came first , square or circle ?", "circle",
                                                          "order", refs=(0, 1))]}]
    eos = model.config.get_text_config().eos_token_id
    batch = train_tiny.collate(proc, examples, eos, options=objectives.TargetOptions(distinct_readout=True,
                                                                                      distinct_sink=2.0))
    ids, g = batch["input_ids"], batch["ground"]
    first = int((ids[0] != tok.pad_token_id).nonzero()[0])
    assert first > 0  # the shorter conversation is left-padded: its first token is not position 0
    slots = (ids[0] == tok.convert_tokens_to_ids(proc.image_token)).nonzero().flatten().reshape(len(frames), 64)
    expected = torch.zeros(ids.shape[1])
    expected[first], expected[slots[0, 1 * 8 + 6]], expected[slots[3, 4 * 8 + 4]] = 0.5, 0.25, 0.25
    rows = g.rows.tolist()
    assert torch.allclose(g.share[rows.index(0)], expected)
    assert not g.share[[i for i, r in enumerate(rows) if r == 1]].any()
    plain = train_tiny.collate(proc, examples, eos, options=objectives.TargetOptions(distinct_readout=True))["ground"]
    assert not plain.share.any()


def test_share_loss_is_the_mean_over_heads_of_the_kl_from_the_target_to_the_heads_attention():
    torch.manual_seed(0)
    attentions = [torch.softmax(torch.randn(2, 3, 5, 5), -1) for _ in range(4)]  # per layer [B, H, L, L]
    share = torch.tensor([[0.5, 0.0, 0.25, 0.25, 0.0]])
    loss = objectives.share_loss(attentions, torch.tensor([1]), torch.tensor([4]), share, layer=2)
    q = attentions[2][1, :, 4]  # [H, L]
    expected = sum(sum(p * math.log(p / q[h, t].item()) for t, p in enumerate(share[0].tolist()) if p)
                   for h in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    exact = [a.clone() for a in attentions]
    exact[2][1, :, 4] = share[0]
    assert objectives.share_loss(exact, torch.tensor([1]), torch.tensor([4]), share, layer=2).item() == pytest.approx(0, abs=1e-6)


def test_count_sink_shares_the_counted_objects_centres_and_a_count_of_zero_all_on_the_sink():
    """A still image of a small red circle (cell (1, 6)) and a big red square (centre cell (4, 4)): with
    count_readout and count_sink=1, "how many red objects" shares 1/3 each on the first token and the
    two centres; "how many green objects" (0) puts everything on the first token; distinct_sink alone
    gives a still image's count no share."""
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS["llava"](tok)
    scene = world.Scene([world.Obj("circle", "red", "small", 6.5 / 8, 1.5 / 8, uid=0),
                         world.Obj("square", "red", "big", 4 / 8, 4 / 8, uid=1)], size=tiny_models.IMAGE)
    qas = [world.QA("how many red objects are there ?", "2", "count", refs=(0, 1)),
           world.QA("how many green objects are there ?", "0", "count")]
    eos = model.config.get_text_config().eos_token_id
    opts = objectives.TargetOptions(count_readout=True, count_sink=1.0)
    batch = train_tiny.collate(proc, [{"scenes": [scene], "qas": qas}], eos, options=opts)
    ids, share = batch["input_ids"][0], batch["ground"].share
    image = (ids == tok.convert_tokens_to_ids(proc.image_token)).nonzero().flatten()
    expected = torch.zeros(len(ids))
    expected[0] = expected[image[1 * 8 + 6]] = expected[image[4 * 8 + 4]] = 1 / 3
    assert torch.allclose(share[0], expected)
    assert share[1][0].item() == 1.0 and share[1].sum().item() == 1.0
    only_distinct = objectives.TargetOptions(count_readout=True, distinct_sink=1.0)
    assert not train_tiny.collate(proc, [{"scenes": [scene], "qas": qas}], eos, options=only_distinct)["ground"].share.any()


def test_mc_fraction_outside_0_1_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"--mc-fraction must be in \[0, 1\], got 1.5"):
        train_tiny.main(["--out", str(tmp_path), "--mc-fraction", "1.5"])


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_mc_fraction_sets_the_share_of_multiple_choice_turns(fraction):
    examples = train_tiny.sample_examples(random.Random(3), 8, video=False, turns=3, mc_fraction=fraction)
    qas = [qa for ex in examples for qa in ex["qas"]]
    lettered = [qa for qa in qas if qa.answer in "ABCD" and qa.options]
    assert len(lettered) == (len(qas) if fraction else 0)


def test_visual_share_loss_is_minus_log_of_the_head_mean_share_among_visual_tokens():
    """The ranking FastV reads: the head mean of layer 1's attention, renormalised over the visual tokens;
    the mass on text tokens (here token 0) does not count."""
    att = torch.full((3, 1, 2, 4, 4), 0.25)  # layers, B, H, L, L
    att[1, 0, 0, 3] = torch.tensor([0.7, 0.2, 0.1, 0.0])  # head 0: 0.2 on the object token 1, 0.1 on token 2
    att[1, 0, 1, 3] = torch.tensor([0.1, 0.3, 0.3, 0.3])  # head 1: 0.3 on the object
    att[2, 0, :, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # layer 2 is not read
    visual = torch.tensor([[False, True, True, False]])
    mask = torch.tensor([[False, True, False, False]])
    loss = objectives.visual_share_loss(list(att), torch.tensor([0]), torch.tensor([3]), mask, visual, layer=1)
    on, seen = (0.2 + 0.3) / 2, (0.3 + 0.6) / 2
    assert loss.item() == pytest.approx(-math.log(on / seen))


def test_typed_fraction_writes_open_questions_the_way_people_type_and_the_normaliser_reads_them_back(monkeypatch):
    """With --typed-fraction 1 every open question is typed (capitals, '?', 'color' ...), multiple choice is
    untouched, and the normaliser the training tokenizer carries gives the world question's words back."""
    from tokensieve.eval.shapeworld import phrasing

    pairs, rephrase = [], phrasing.rephrase
    monkeypatch.setattr(phrasing, "rephrase", lambda q, rng: pairs.append((q, rephrase(q, rng))) or pairs[-1][1])
    examples = train_tiny.sample_examples(random.Random(5), 40, False, turns=3, mc_fraction=0.3, typed_fraction=1.0)
    qas = [qa for ex in examples for qa in ex["qas"]]
    assert [t for _, t in pairs] == [qa.question for qa in qas if not qa.options]
    assert any(qa.options for qa in qas)  # (asked as the world asks them)
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    tok.backend_tokenizer.normalizer = phrasing.normalizer(tok.get_vocab())
    mark = tok.convert_tokens_to_ids("?")
    assert sum(w != t for w, t in pairs) > 40
    for world_q, typed_q in pairs:  # (people may leave out the "?")
        words = [[i for i in tok(q)["input_ids"] if i != mark] for q in (world_q, typed_q)]
        assert words[0] == words[1], (world_q, typed_q)

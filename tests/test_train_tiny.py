"""The tiny-model training script: runs, saves a checkpoint that tokensieve loads, covers the world's words,
and builds its batches in exactly the engine's prompt format."""
import random

import pytest
import torch

import tokensieve
from tokensieve.eval import tiny_models, train_tiny, world
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
    assert batch["cells"].shape == (1, tiny_models.GRID ** 2, 3)


def test_unlocked_curriculum():
    assert train_tiny.unlocked(("a", "b", "c"), 0, 10) == ("a",)
    assert train_tiny.unlocked(("a", "b", "c"), 10, 10) == ("a", "b")
    assert train_tiny.unlocked(("a", "b", "c"), 5, 0) == ("a", "b", "c")


def test_two_steps_then_load(tmp_path):
    train_tiny.main(["--out", str(tmp_path), "--steps", "2", "--batch", "2", "--video-batch", "1", "--tower-steps", "1",
                     "--eval-every", "2", "--eval-n", "2", "--save-every", "2", "--freeze-tower"])
    assert (tmp_path / "train_log.jsonl").read_text().count("held_out") == 1
    with tokensieve.load(str(tmp_path)) as engine:
        img = world.render(world.random_scene(random.Random(0), size=tiny_models.IMAGE))
        res = engine.generate("what colour is the circle ?", images=[img], plan="cls:keep=0.25", max_new_tokens=2)
    assert res.stats["visual_tokens"] == 64 and res.stats["kept_tokens"] == 16

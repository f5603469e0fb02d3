"""The tiny-model training script: runs, saves a checkpoint that tokensieve loads, covers the world's words."""
import random

import tokensieve
from tokensieve.eval import train_tiny, world
from tokensieve.testing import make_tokenizer


def test_vocabulary_covers_the_world():
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    rng = random.Random(123)  # a different seed from the one the vocabulary was collected with
    for _ in range(200):
        for qa in world.image_questions(world.random_scene(rng), rng):
            qa = world.multiple_choice(qa, rng)
            assert tok.unk_token_id not in tok(qa.question + " " + qa.answer)["input_ids"], qa.question


def test_two_steps_then_load(tmp_path):
    train_tiny.main(["--out", str(tmp_path), "--steps", "2", "--batch", "2", "--eval-every", "2", "--save-every", "2"])
    assert (tmp_path / "train_log.jsonl").read_text().count("held_out") == 1
    with tokensieve.load(str(tmp_path)) as engine:
        img = world.render(world.random_scene(random.Random(0), size=train_tiny.IMAGE))
        res = engine.generate("what colour is the circle ?", images=[img], plan="cls:keep=0.25", max_new_tokens=2)
    assert res.stats["visual_tokens"] == 64 and res.stats["kept_tokens"] == 16

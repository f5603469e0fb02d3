"""Questions as people type them (issue 29, item 1): the shipped tokenizers read a typed question as the
world's own wording, and the shipped models answer typed held-out questions like the world's."""
import random

import pytest
from transformers import AutoTokenizer

from tokensieve.eval.shapeworld import phrasing, shipped, train_tiny, world

# typed question -> the world's wording it must read as (written by hand, not by phrasing.rephrase)
TYPED = {
    "What color is the circle?": "what colour is the circle ?",
    "What is the colour of the star?": "what colour is the star ?",
    "what's the color of the big red square": "what colour is the big red square",
    "Which colour is the triangle? Please.": "what colour is the triangle ?",
    "Colour of the cross?": "what colour is the cross ?",
    "What is the shape of the red object?": "what shape is the red object ?",
    "HOW MANY blue objects are there?": "how many blue objects are there ?",
    "How many circles are in the image?": "how many are there ?",  # "circles" is no world word: dropped
    "Is there a green star, please?": "is there a green star , ?",
    "Which shape came first, circle or star?": "which shape came first , circle or star ?",
    "Where is the red circle?": "which quadrant is the red circle ?",
    "what colour is the circle ? A . red B . blue": "what colour is the circle ? A . red B . blue",
    "Answer: A. red.": "A . red",
    "What colour is the zebra-striped circle?": "what colour is the circle ?",  # unknown words dropped
}


@pytest.mark.parametrize("name", list(shipped.MODELS))
def test_shipped_tokenizer_reads_typed_questions_as_the_world_does(name):
    tok = AutoTokenizer.from_pretrained(shipped.path(name))
    for typed, wording in TYPED.items():
        assert tok.tokenize(typed) == wording.split(), typed
    template = tok.tokenize("USER: <image> What color is the circle? ASSISTANT:")
    assert template[0] == "USER:" and template[-1] == "ASSISTANT:" and "<unk>" not in template


def test_world_wording_is_unchanged_by_the_normaliser():
    tok = AutoTokenizer.from_pretrained(shipped.path("llava"))
    rng = random.Random(5)
    for _ in range(40):
        scene = world.random_scene(rng)
        for qa in world.image_questions(scene, rng):
            q = world.multiple_choice(qa, rng).question if rng.random() < 0.5 else qa.question
            assert tok.tokenize(q) == q.split()


def test_rephrase_changes_the_wording_but_not_the_question():
    tok = AutoTokenizer.from_pretrained(shipped.path("llava"))
    rng = random.Random(0)
    changed = 0
    for _ in range(60):
        qa = rng.choice(world.image_questions(world.random_scene(rng), rng))
        typed = phrasing.rephrase(qa.question, rng)
        changed += typed.split() != qa.question.split()
        words = [w for w in tok.tokenize(typed) if w not in ",?"]  # typed questions may lack the "?"
        assert words == [w for w in qa.question.split() if w not in ",?"], typed
    assert changed >= 50


def test_typed_held_out_questions_are_answered_by_the_engine():
    import tokensieve
    rng, typing = random.Random(10_000), random.Random(1)
    right = n = 0
    with tokensieve.load(shipped.path("llava")) as engine:
        for ex in train_tiny.sample_examples(rng, 24, video=False, mc_fraction=0.0):
            qa = ex["qas"][0]
            typed = phrasing.rephrase(qa.question, typing)
            text = engine.generate(typed, images=[world.render(s) for s in ex["scenes"]], max_new_tokens=1).text
            right += text.strip() == qa.answer
            n += 1
    assert right >= 22, f"{right}/{n} typed held-out questions answered"

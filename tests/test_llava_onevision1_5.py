"""LLaVA-OneVision-1.5 (``llava_onevision1_5``): what the walking suites cannot see.

The tiny ``make_tiny`` model runs the invariant suites through tests/test_invariants.py, tests/test_native_video.py
and tests/test_pruners.py; the tester configuration runs them through tests/test_tester_configs.py and
tests/test_tester_configs_video.py. Here, each against the plain transformers model: the LLM's positions are 1-D
(those ``generate`` gives the language model, padded batch included); a native video is one run of video tokens,
one grid frame per frame (no temporal patch), its markers never pruned; the tower puts every image and every frame
through as its own sequence with a class token (the metering's sequence lengths), which the LLM never receives;
CLS pruners are refused, naming the missing CLS tower.
"""
import pytest
import torch
from transformers import AutoModelForImageTextToText

from tokensieve.engine.errors import PlanError

from conftest import noise_image

FAMILY = "llava_onevision1_5"
PROMPT = "what appeared first"


def _video(n: int = 4, h: int = 40, w: int = 56):
    return {"frames": [noise_image(30 + i, h, w) for i in range(n)], "video_fps": 2.0}


@pytest.fixture(scope="module")
def plain(tiny_path):
    """The plain transformers model of the tiny checkpoint (no engine hooks)."""
    return AutoModelForImageTextToText.from_pretrained(tiny_path(FAMILY)).eval()


def _language_model_calls(model, call) -> list[dict]:
    """The keyword arguments of every call of ``model``'s language model during ``call()``."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen


def test_positions_are_the_1d_ones_generate_gives_the_language_model(engine_for, plain):
    """A left-padded batch: the adapter's prefill positions [B, L] are those transformers' ``generate`` passes to
    the Qwen3 LM on its first step (1-D: no M-RoPE axes), on every real token."""
    engine = engine_for(FAMILY)
    inputs = engine.prepare_batch([dict(prompt=PROMPT, images=[noise_image(0, 64, 64)]),
                                   dict(prompt="is it red", images=[noise_image(1, 24, 32)])])
    mask = inputs["attention_mask"].bool()
    assert not mask.all()  # the batch is padded
    calls = _language_model_calls(plain, lambda: plain.generate(**inputs, max_new_tokens=1, do_sample=False))
    ref = calls[0]["position_ids"]
    ours = engine.adapter.position_ids(inputs)
    assert ours.shape == ref.shape == inputs["input_ids"].shape
    assert torch.equal(ours[mask], ref[mask])


def test_a_video_is_one_run_of_video_tokens_one_grid_frame_per_frame(engine_for):
    """``<|vision_start|>``, (frames x h/2 x w/2) ``<|video_pad|>``, ``<|vision_end|>``: written by hand from the
    frame size (patch 4, merge 2: 8 px a token); coords give frame f to the f-th block of the run."""
    engine = engine_for(FAMILY)
    tok = engine.processor.tokenizer
    inputs = engine.prepare(PROMPT, video=_video(n=4, h=40, w=56))
    assert inputs["video_grid_thw"].tolist() == [[4, 10, 14]]  # one temporal index per frame
    ids = inputs["input_ids"][0].tolist()
    start = ids.index(tok.convert_tokens_to_ids("<|vision_start|>"))
    per_frame = (40 // 8) * (56 // 8)
    expected = tok.convert_tokens_to_ids(["<|vision_start|>"] + ["<|video_pad|>"] * 4 * per_frame + ["<|vision_end|>"])
    assert ids[start:start + len(expected)] == expected
    coords = engine.adapter.video_coords(inputs)[0]
    assert coords[:, 0].tolist() == [f for f in range(4) for _ in range(per_frame)]
    assert coords[:per_frame, 1:].tolist() == [[r, c] for r in range(5) for c in range(7)]


def test_pruning_a_video_keeps_every_text_token(engine_for):
    """The LLM's first layer receives every text token (the vision markers included) and the kept video tokens,
    in sequence order: the text rows equal the model's own embeddings of the processor's text ids."""
    engine = engine_for(FAMILY)
    inputs = engine.prepare(PROMPT, video=_video())
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("h", (args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = engine.model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        res = engine.generate(PROMPT, video=_video(), plan="random:keep=0.25", max_new_tokens=1)
    finally:
        handle.remove()
    ids = inputs["input_ids"][0]
    visual = ids == engine.model.config.video_token_id
    slots = visual.nonzero().flatten()
    keep = ~visual
    keep[slots[res.kept[0]]] = True
    assert res.kept[0].numel() == round(slots.numel() * 0.25)
    h = captured["h"][0]
    assert h.shape[0] == int(keep.sum())
    with torch.no_grad():
        table = engine.model.get_input_embeddings()(ids[~visual][None])[0]
    torch.testing.assert_close(h[~visual[keep]], table)


def _tower_sequences(model, call) -> list[int]:
    """The sequence lengths the tower's first block attends over during ``call()`` (its ``cu_seqlens``)."""
    seen = []
    handle = model.model.visual.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[1] if len(args) > 1 else kwargs["cu_seqlens"]).diff().tolist()),
        with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return [n for s in seen for n in s]


def test_tower_sequences_are_each_image_and_frame_with_its_class_token(engine_for, plain):
    """Metering: the adapter's per-image and per-frame tower sequences are the lengths the plain model's tower
    attends over (h * w patches + 1 class token each), and the tower's rows are those plus one class row each."""
    engine = engine_for(FAMILY)
    images = engine.prepare(PROMPT, images=[noise_image(0, 64, 64), noise_image(1, 24, 32)])
    video = engine.prepare(PROMPT, video=_video(n=3))
    ours = [n for seqs in engine.adapter.tower_sequences(images) for n in seqs]
    ours_video = [n for seqs in engine.adapter.video_tower_sequences(video) for n in seqs]
    assert ours == _tower_sequences(plain, lambda: plain(**images))
    assert ours_video == _tower_sequences(plain, lambda: plain(**video))
    assert ours == [16 * 16 + 1, 6 * 8 + 1] and ours_video == [10 * 14 + 1] * 3  # 4 px patches


def test_features_are_those_the_model_places_without_the_class_token(engine_for, plain):
    """``encode_images`` gives, per image, the rows the plain model's forward scatters into its image slots (the
    class token dropped before the merger: one feature per merged 2 x 2 block, none for the class token)."""
    engine = engine_for(FAMILY)
    inputs = engine.prepare(PROMPT, images=[noise_image(0, 64, 64), noise_image(1, 24, 32)])
    with torch.no_grad():
        feats = engine.adapter.encode_images(inputs)
    calls = _language_model_calls(plain, lambda: plain(**inputs))
    slots = inputs["input_ids"][0] == engine.model.config.image_token_id
    placed = calls[0]["inputs_embeds"][0][slots]
    assert [f.shape[0] for f in feats] == [64, 12]  # (64/8)^2, (24/8) x (32/8)
    torch.testing.assert_close(torch.cat(feats), placed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan", ["flowcut:where=pre_llm,keep=0.25", "rollout:keep=0.25"])
def test_cls_pruners_are_refused_naming_the_cls_tower(engine_for, plan):
    """The tower has a class token, but in packed sequences the engine does not hook: CLS pruners are refused
    before any model work, naming what is missing."""
    engine = engine_for(FAMILY)
    assert not engine.adapter.cls_tower and engine.adapter.vision_layers is None
    with pytest.raises(PlanError, match="needs a vision tower with a CLS token"):
        engine.check_plan(plan)

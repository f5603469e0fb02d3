"""SmolVLM2 (``smolvlm``): what the walking suites cannot see.

The tiny ``make_tiny`` model runs the invariant suites through tests/test_invariants.py, tests/test_pruners.py
and tests/test_families.py, and transformers' tester configuration through tests/test_tester_configs.py; this
file checks, against references built here from the processor's and the model's own pieces: the crop layout
(image splitting into sub-images plus the global image), the pixel-shuffle coords, the per-image features,
and native video (the processor's own timestamped prompt: no plan == transformers, pruning keeps the
timestamps, cached == recomputed, batches == one at a time).
"""
import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.video_utils import VideoMetadata

import tokensieve
from tokensieve import testing
from tokensieve.engine.adapters import smolvlm
from tokensieve.engine.errors import InputError, PlanError

from conftest import noise_image
from test_invariants import ATOL, assert_matches_recompute
from tester_configs import write_tester_model

PROMPTS = ["what appeared first", "how many objects", "is there a red circle"]
STAMPS = tuple(f"00:0{s}:" for s in range(4))  # the processor's "Frame from MM:SS:" timestamps of 4 frames at 1 fps


def _video(seed: int, n: int = 4, fps: float = 4.0):
    return {"frames": [noise_image(seed * 10 + i, 40, 56) for i in range(n)], "video_fps": fps}


def _write_stamped(path) -> str:
    """The tiny model with "Frame", "from" and the timestamps as words, so the prompt's timestamps are tokens."""
    torch.manual_seed(0)
    model, processor = smolvlm.tiny_model(testing.tokenizer_for("smolvlm", extra_words=("Frame", "from") + STAMPS))
    tok = processor.tokenizer
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return {"stamped": _write_stamped(tmp_path_factory.mktemp("smol_stamped")),
            "tester": write_tester_model("smolvlm", tmp_path_factory.mktemp("smol_tester"))}


@pytest.fixture(scope="module")
def engines(paths):
    loaded = {name: tokensieve.load(p) for name, p in paths.items()}
    yield loaded
    for e in loaded.values():
        e.close()


# ---- images: crops, coords, features ------------------------------------------------------------------

def test_crops_follow_the_image_processors_split(engine_for):
    """Tiles per image == the image processor's own rows x cols + the global image (3 and 5 crops here)."""
    engine = engine_for("smolvlm")
    images = [noise_image(0, 20, 60), noise_image(1, 40, 56)]
    split = engine.processor.image_processor(images=[images], return_row_col_info=True)
    expected = [r * c + 1 for r, c in zip(split["rows"][0], split["cols"][0])]
    assert expected == [3, 5]
    inputs = engine.prepare("what is the colour", images=images)
    assert engine.adapter.tiles_per_image(inputs) == expected
    coords = engine.adapter.image_coords(inputs)
    per_crop = engine.processor.image_seq_len
    assert [c.shape[0] for c in coords] == [n * per_crop for n in expected]
    assert int((inputs["input_ids"] == engine.model.config.image_token_id).sum()) == sum(c.shape[0] for c in coords)
    for c, n in zip(coords, expected):  # item k: crop k's tokens, sub-images first, the global crop last
        assert c[:, 0].tolist() == [k for k in range(n) for _ in range(per_crop)]
    assert engine.adapter.tower_sequences(inputs) == [[per_crop * 4] * n for n in expected]  # 4 patches per token


def test_coords_follow_the_models_pixel_shuffle(engine_for):
    """(row, col) of each token == the top-left patch of the block the connector's own pixel shuffle gives it,
    halved: the shuffle run here on a grid of patch coordinates."""
    engine = engine_for("smolvlm")
    vc, s = engine.model.config.vision_config, engine.model.config.scale_factor
    side = vc.image_size // vc.patch_size
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    patches = torch.stack([r, c], -1).reshape(1, side * side, 2).float()  # [1, P, 2] raster patch coords
    shuffled = engine.model.model.connector.pixel_shuffle(patches, s)[0]  # [P / s^2, 2 s^2]
    blocks = shuffled.reshape(shuffled.shape[0], -1, 2)  # the s^2 patches of each token
    expected = torch.stack([blocks[..., 0].min(1).values, blocks[..., 1].min(1).values], 1).long() // s
    inputs = engine.prepare("what", images=[noise_image(0)])
    coords = engine.adapter.image_coords(inputs)[0]
    for k in range(int(coords[:, 0].max()) + 1):
        assert torch.equal(coords[coords[:, 0] == k, 1:], expected)


def test_features_per_image_equal_each_image_alone(engine_for):
    """A request's two images: each one's features == the model's get_image_features on that image alone."""
    engine = engine_for("smolvlm")
    images = [noise_image(0, 20, 60), noise_image(1, 40, 56)]
    with torch.no_grad():
        feats = engine.adapter.encode_images(engine.prepare("what", images=images))
        for img, got in zip(images, feats):
            alone = engine.prepare("what", images=[img])
            ref = engine.model.model.get_image_features(alone["pixel_values"], alone["pixel_attention_mask"])
            torch.testing.assert_close(got, ref.pooler_output[0], atol=1e-5, rtol=1e-5)


def test_tower_features_are_the_connectors_input(engine_for):
    """The projector's input given to tower.features pruners projects back to the features."""
    engine = engine_for("smolvlm")
    inputs = engine.prepare("what", images=[noise_image(0, 20, 60), noise_image(1)])
    with torch.no_grad():
        feats, tower = engine.adapter.encode_images_and_tower(inputs)
        for f, t in zip(feats, tower):
            assert t.shape == (f.shape[0], engine.model.config.vision_config.hidden_size * 4)
            torch.testing.assert_close(engine.adapter.project(t), f, atol=1e-5, rtol=1e-5)


def test_refusals_name_the_reason(engine_for):
    engine = engine_for("smolvlm")
    with pytest.raises(PlanError, match="no vision-tower stages"):
        engine.check_plan("uniform:where=vision,layer=1,keep=0.5")
    with pytest.raises(InputError, match="cannot take images and a native video in one request"):
        engine.generate("what", images=[noise_image(0)], video=_video(0), max_new_tokens=1)
    res = engine.generate("what", images=[noise_image(0)], video=_video(0), video_mode="frames", max_new_tokens=1)
    assert res.stats["visual_tokens"] == 5 * 5 * 16  # the image and 4 frames, each split into 2 x 2 crops + global


# ---- native video: the processor's timestamped frames ---------------------------------------------------

def test_video_prompt_is_the_processors_own(engines):
    """engine.prepare == SmolVLMProcessor called here with the frames and their metadata; the prompt holds one
    "Frame from MM:SS:" line (1 fps: 00:00 .. 00:03) before each frame's global crop."""
    engine = engines["stamped"]
    video = _video(0, fps=1.0)
    got = engine.prepare(PROMPTS[0], video=video)
    text = engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPTS[0]}]}],
        add_generation_prompt=True, tokenize=False)
    ref = engine.processor(text=[text], videos=[np.stack([np.asarray(f) for f in video["frames"]])],
                           video_metadata=[VideoMetadata(total_num_frames=4, fps=1.0, frames_indices=[0, 1, 2, 3])],
                           do_sample_frames=False, return_tensors="pt")
    assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["pixel_values"], ref["pixel_values"])
    tok = engine.processor.tokenizer
    words = tok.convert_ids_to_tokens(got["input_ids"][0].tolist())
    at = [words.index(s) for s in STAMPS]
    assert at == sorted(at) and all(words[i + 1:i + 3] == ["<fake_token_around_image>", "<global-img>"] for i in at)
    assert words.count("<image>") == 4 * engine.processor.image_seq_len


def test_pruning_keeps_the_timestamps(engines):
    """FastV at layer 2 keeping a quarter: the LLM's layer-2 input holds every timestamp token's embedding
    (text is never pruned) and only the kept visual tokens."""
    engine = engines["stamped"]
    tok = engine.processor.tokenizer
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("hidden", (args[0] if args else kwargs["hidden_states"]).shape[1])

    inputs = engine.prepare(PROMPTS[0], video=_video(0, fps=1.0))
    h = engine.model.model.text_model.layers[2].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        res = engine.generate(PROMPTS[0], video=_video(0, fps=1.0), plan="fastv:layer=2,keep=0.25", max_new_tokens=1)
    finally:
        h.remove()
    n_vis = res.stats["visual_tokens"]
    assert n_vis == 64 and res.kept[0].numel() == 16
    assert seen["hidden"] == inputs["input_ids"].shape[1] - n_vis + 16  # every text token, the kept visual ones
    ids = inputs["input_ids"][0].tolist()
    assert all(ids.count(tok.convert_tokens_to_ids(s)) == 1 for s in STAMPS)
    assert res.stats["tokens_per_frame"] == torch.bincount(res.frames[res.kept[0]], minlength=4).tolist()
    assert res.frames.tolist() == [f for f in range(4) for _ in range(16)]


@pytest.mark.parametrize("name", ["tiny", "tester"])
def test_video_no_plan_matches_transformers(engine_for, tiny_path, engines, paths, name):
    engine = engine_for("smolvlm") if name == "tiny" else engines["tester"]
    path = tiny_path("smolvlm") if name == "tiny" else paths["tester"]
    reqs = [dict(prompt=PROMPTS[i], video=_video(i), max_new_tokens=5) for i in range(2)]
    inputs = engine.prepare_batch(reqs)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_tokens, ref_logits = out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()
    for b, res in enumerate(engine.generate_batch(reqs, output_logits=True)):
        n = len(res.token_ids)
        assert res.token_ids == ref_tokens[b, :n].tolist()
        torch.testing.assert_close(res.logits, ref_logits[b, :n], atol=ATOL, rtol=1e-4)
        assert res.stats["frames"] == 4 and res.kept == []


@pytest.mark.parametrize("plan", ["fastv:layer=2,keep=0.25", "uniform:keep=0.5,positions=original;fastv:layer=1,keep=6"])
def test_video_cached_decode_equals_uncached_recompute(engine_for, tiny_path, plan):
    engine = engine_for("smolvlm")
    res = engine.generate(PROMPTS[0], video=_video(0), plan=plan, max_new_tokens=5, output_logits=True)
    assert res.stats["kept_tokens"] < res.stats["visual_tokens"]
    assert_matches_recompute(engine, tiny_path("smolvlm"), res, engine.prepare(PROMPTS[0], video=_video(0)))


@pytest.mark.parametrize("plan", [None, "random:keep=0.5;fastv:layer=2,keep=0.25"])
def test_video_and_image_requests_batched_equal_one_at_a_time(engine_for, plan):
    """Video requests and an image request in one call (run in separate batches: one processor call cannot
    take both) == each alone."""
    engine = engine_for("smolvlm")
    reqs = [dict(prompt=PROMPTS[i], video=_video(i), plan=plan, max_new_tokens=5) for i in range(2)]
    reqs.insert(1, dict(prompt="what is the colour of the circle", images=[noise_image(7)], plan=plan, max_new_tokens=5))
    batched = engine.generate_batch(reqs, output_logits=True)
    assert [r.stats["batch_size"] for r in batched] == [2, 1, 2]
    for req, res in zip(reqs, batched):
        one = engine.generate_batch([req], output_logits=True)[0]
        assert res.token_ids == one.token_ids
        assert [k.tolist() for k in res.kept] == [k.tolist() for k in one.kept]
        torch.testing.assert_close(res.logits, one.logits, atol=ATOL, rtol=1e-4)
    with pytest.raises(InputError, match="separate processor calls"):
        engine.prepare_batch([reqs[0], reqs[1]])


# ---- tower records (no CLS): HoliTom's received attention -----------------------------------------------

def test_holitom_reads_the_towers_received_attention(engine_for, tiny_path, monkeypatch):
    """Native video, 8 frames of one crop (4 x 4 tokens of 2 x 2 patches): HoliTom's kept set and merged features
    == official_holitom on the model's own features and the attention each patch receives in the tower's last
    layer (the connector's input), recomputed here from the plain model's q/k and averaged over each token's
    2 x 2 patch block by reshaping (not by the model's pixel shuffle)."""
    from reference import clip_tower_attention
    from test_official_holitom import QUESTION, engine_check, received, still_video

    engine = engine_for("smolvlm")
    frames = still_video(8, seed=2)
    inputs = engine.prepare(QUESTION, video=frames)
    model = AutoModelForImageTextToText.from_pretrained(tiny_path("smolvlm")).eval()
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"])
    feats = feats.pooler_output[0].view(8, 16, -1)
    attn, _ = clip_tower_attention(model.model.vision_model, inputs["pixel_values"][0])
    recv = received(attn[-1]).view(8, 4, 2, 4, 2).mean((2, 4)).reshape(8, 16)
    seen = []
    for ratio, tau in ((0.25, 0.8), (0.5, 0.65)):
        seen += engine_check(engine, frames, feats, recv, ratio, tau, monkeypatch)
    assert any(e > s for s, e in seen)  # static windows in play

"""GLM-4.1V / GLM-4.5V (``glm4v``): what the walking suites cannot see.

The tiny ``make_tiny`` model runs the invariant suites through tests/test_invariants.py, tests/test_native_video.py
(no plan == transformers generate on video, single and padded, and the rest) and tests/test_pruners.py; the
tester configuration runs them through tests/test_tester_configs.py and tests/test_tester_configs_video.py.
Here: the native video prompt form (per temporal patch ``<|begin_of_image|> <|image|>... <|end_of_image|>`` and
its whole-second timestamp, between the video markers) written as expected and never pruned; RoPE undone on
GLM's layout (half of each head rotated, pairs interleaved); images and a native video refused in one request.
"""
import pytest
import torch

from tokensieve.engine.errors import InputError
from tokensieve.engine.signals import unrotate

from conftest import noise_image

PROMPT = "what appeared first"


def _video(fps: float, n: int = 4):
    return {"frames": [noise_image(20 + i) for i in range(n)], "video_fps": fps}


def _expected_video_ids(tok, n_patches: int, per_patch: int, fps: float) -> list[int]:
    """The video's run of ids written by hand: each temporal patch t (frames 2t, 2t+1) is its image tokens between
    the image markers, then the whole seconds of frame 2t; the run between the video markers."""
    words = ["<|begin_of_video|>"]
    for t in range(n_patches):
        words += ["<|begin_of_image|>"] + ["<|image|>"] * per_patch + ["<|end_of_image|>", str(int(2 * t / fps))]
    return tok.convert_tokens_to_ids(words + ["<|end_of_video|>"])


def _video_run(ids: torch.Tensor, tok) -> list[int]:
    start, end = tok.convert_tokens_to_ids(["<|begin_of_video|>", "<|end_of_video|>"])
    ids = ids.tolist()
    return ids[ids.index(start):ids.index(end) + 1]


@pytest.mark.parametrize("fps,n", [(1.0, 4), (4.0, 8)])
def test_video_prompt_has_per_frame_timestamps(engine_for, fps, n):
    """Every frame the engine sampled reaches the prompt (the processor's own fps sampling is off), each temporal
    patch with the time of its first frame."""
    engine = engine_for("glm4v")
    tok = engine.processor.tokenizer
    inputs = engine.prepare(PROMPT, video=_video(fps, n))
    t, h, w = inputs["video_grid_thw"][0].tolist()
    per_patch = h * w // engine.model.config.vision_config.spatial_merge_size ** 2
    assert t == n // 2  # temporal patch 2
    assert _video_run(inputs["input_ids"][0], tok) == _expected_video_ids(tok, t, per_patch, fps)
    # the video's visual tokens are the image tokens between the video markers: the processor types them 2
    ids, types = inputs["input_ids"][0], inputs["mm_token_type_ids"][0]
    assert torch.equal(types == 2, ids == engine.model.config.image_token_id)
    assert int((ids == engine.model.config.video_token_id).sum()) == 0


def test_pruning_a_video_keeps_every_text_token(engine_for):
    """The LLM's first layer receives every text token (markers and timestamps) and the kept visual tokens, in
    sequence order: compared with the embeddings of the processor's ids, taken from the model's own table."""
    engine = engine_for("glm4v")
    inputs = engine.prepare(PROMPT, video=_video(fps=1.0))
    captured = {}
    layer0 = engine.model.model.language_model.layers[0]

    def grab(module, args, kwargs):
        captured.setdefault("h", (args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        res = engine.generate(PROMPT, video=_video(fps=1.0), plan="random:keep=0.25", max_new_tokens=1)
    finally:
        handle.remove()
    ids = inputs["input_ids"][0]
    visual = ids == engine.model.config.image_token_id
    slots = visual.nonzero().flatten()
    keep = ~visual
    keep[slots[res.kept[0]]] = True
    assert res.kept[0].numel() == slots.numel() // 4
    h = captured["h"][0]
    assert h.shape[0] == int(keep.sum())
    text_rows = ~visual[keep]  # the text tokens among those entering the LLM, in order
    with torch.no_grad():
        table = engine.model.get_input_embeddings()(ids[~visual][None])[0]
    torch.testing.assert_close(h[text_rows], table)


def test_unrotate_inverts_glm_rope(engine_for):
    """The engine's RoPE-free scores (``llm.last_query_norope``, ``llm.text_rows_full``) undo GLM-4V's own
    RoPE: the first half of each head rotated, pairs interleaved (the tiny model: head 16, 8 dims rotated)."""
    import importlib

    engine = engine_for("glm4v")
    lm = engine.model.model.language_model
    own = importlib.import_module(type(lm.layers[0].self_attn).__module__)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, lm.layers[0].self_attn.head_dim)
    pos = torch.arange(6)[None, None].expand(3, 1, 6) * torch.tensor([1, 2, 3])[:, None, None]
    cos, sin = lm.rotary_emb(x, pos)
    assert cos.shape[-1] < x.shape[-1]  # partial rotary
    rotated, _ = own.apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(unrotate(rotated, cos, sin, engine.adapter.rope_layout), x)


def test_images_and_native_video_in_one_request_are_refused(engine_for):
    """transformers' GLM-4V forward takes every image token as an image and as a video token: one request cannot
    hold both; the engine says so before any model work."""
    engine = engine_for("glm4v")
    with pytest.raises(InputError, match="cannot take images and a native video in one request"):
        engine.generate(PROMPT, images=[noise_image(1)], video=_video(fps=1.0), max_new_tokens=1)

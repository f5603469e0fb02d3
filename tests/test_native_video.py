"""The engine's invariants on native video (Qwen2-VL, Qwen2.5-VL ``videos=``, LLaVA-OneVision ``<video>``),
against plain transformers and the independent eager reference of tests/reference.py.

(a) no plan == transformers generate on the same video input; (b) keep-everything == no plan;
(c) pruned + cached decoding == recomputing without a cache; (d) a padded batch == one request at
a time; (e) kept indices in original coordinates (FastV == top-k of eager attention).
"""
import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import noise_image
from reference import hidden_slots, reference_model
from test_invariants import ATOL, _capture_last_row, assert_matches_recompute

NATIVE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl", "glm4v", "llava_onevision1_5")
PROMPTS = ["what appeared first", "how many objects", "is there a red circle"]


def _video(seed: int, n: int = 4, h: int = 40, w: int = 56):
    return {"frames": [noise_image(seed * 10 + i, h, w) for i in range(n)], "video_fps": 4.0}


def _requests(n: int):
    return [dict(prompt=PROMPTS[i], video=_video(i)) for i in range(n)]


@pytest.fixture(params=NATIVE)
def native(request):
    return request.param


def test_native_inputs_are_the_processors_video_inputs(native, engine_for):
    engine = engine_for(native)
    inputs = engine.prepare(PROMPTS[0], video=_video(0))
    if native == "internvl":  # frames in pixel_values, each a run of the image context token (test_internvl.py)
        assert "pixel_values_videos" not in inputs and inputs["pixel_values"].shape[0] == 4
        return
    assert "pixel_values_videos" in inputs and "pixel_values" not in inputs
    frames_mode = engine.prepare(PROMPTS[0], video=_video(0), video_mode="frames")
    if native == "glm4v":  # frames are image tokens, typed video (2) by the processor (test_glm4v.py)
        assert int((inputs["mm_token_type_ids"] == 2).sum()) > 0
        assert "pixel_values_videos" not in frames_mode and int((frames_mode["mm_token_type_ids"] == 2).sum()) == 0
        return
    vid = engine.model.config.video_token_id
    assert int((inputs["input_ids"] == vid).sum()) > 0
    assert "pixel_values_videos" not in frames_mode and int((frames_mode["input_ids"] == vid).sum()) == 0


@pytest.mark.parametrize("batched", [False, True], ids=["single", "padded"])
def test_a_no_plan_matches_transformers_generate(native, engine_for, tiny_path, batched):
    engine = engine_for(native)
    reqs = _requests(3 if batched else 1)
    inputs = engine.prepare_batch(reqs)
    model = AutoModelForImageTextToText.from_pretrained(tiny_path(native)).eval()
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    ref_logits = torch.stack(out.logits, dim=1).float()
    results = engine.generate_batch([dict(r, max_new_tokens=5) for r in reqs], output_logits=True)
    for b, res in enumerate(results):
        n = len(res.token_ids)
        assert res.token_ids == ref_tokens[b, :n].tolist()
        torch.testing.assert_close(res.logits, ref_logits[b, :n], atol=ATOL, rtol=1e-4)
        assert res.stats["frames"] == 4 and res.stats["frame_indices"] == [0, 1, 2, 3]


@pytest.mark.parametrize("plan", ["random:keep=1.0", "fastv:layer=1,keep=1.0", "uniform:keep=1.0;fastv:layer=2,keep=1.0"])
def test_b_keep_everything_is_identity(native, engine_for, plan):
    engine = engine_for(native)
    reqs = [dict(r, max_new_tokens=4) for r in _requests(2)]
    base = engine.generate_batch(reqs, output_logits=True)
    kept = engine.generate_batch([dict(r, plan=plan) for r in reqs], output_logits=True)
    for a, b in zip(base, kept):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan", ["fastv:layer=2,keep=0.25", "uniform:keep=0.5,positions=original;fastv:layer=1,keep=6"])
def test_c_cached_decode_equals_uncached_recompute(native, engine_for, tiny_path, plan):
    engine = engine_for(native)
    req = _requests(1)[0]
    res = engine.generate(req["prompt"], video=req["video"], plan=plan, max_new_tokens=5, output_logits=True)
    assert_matches_recompute(engine, tiny_path(native), res, engine.prepare(req["prompt"], video=req["video"]))


@pytest.mark.parametrize("plan", [None, "random:keep=0.5;fastv:layer=2,keep=0.25"])
def test_d_padded_batch_equals_one_at_a_time(native, engine_for, plan):
    engine = engine_for(native)
    reqs = [dict(r, plan=plan, max_new_tokens=5) for r in _requests(2)]
    reqs.append(dict(prompt="what is the colour of the circle", images=[noise_image(7)], plan=plan, max_new_tokens=5))
    batched = engine.generate_batch(reqs, output_logits=True)
    for req, res in zip(reqs, batched):
        one = engine.generate_batch([req], output_logits=True)[0]
        assert res.token_ids == one.token_ids
        assert [k.tolist() for k in res.kept] == [k.tolist() for k in one.kept]
        torch.testing.assert_close(res.logits, one.logits, atol=ATOL, rtol=1e-4)


def test_e_fastv_kept_set_is_topk_of_eager_attention(native, engine_for, tiny_path):
    engine = engine_for(native)
    req = _requests(1)[0]
    res = engine.generate(req["prompt"], video=req["video"], plan="uniform:keep=16,positions=original;fastv:layer=2,keep=5",
                          max_new_tokens=2)
    uni, fast = res.kept
    inputs = engine.prepare(req["prompt"], video=req["video"])
    n_layers = engine.model.config.get_text_config().num_hidden_layers
    hide = hidden_slots(inputs["input_ids"], engine.adapter.visual_token_ids, [uni] * n_layers)
    ref = reference_model(tiny_path(native), hide)
    captured = {}
    hook = _capture_last_row(ref, layer=1, store=captured, hide=hide[1])
    with torch.no_grad():
        ref(**inputs)
    hook.remove()
    slots = torch.isin(inputs["input_ids"][0], torch.tensor(engine.adapter.visual_token_ids)).nonzero().flatten()
    attn = captured["row"][slots[uni]]
    assert fast.tolist() == uni[torch.topk(attn, 5).indices].sort().values.tolist()


def test_per_frame_results(native, engine_for):
    """coords / frames are per (frame, row, col); tokens_per_frame counts the kept tokens of each grid frame."""
    engine = engine_for(native)
    res = engine.generate(PROMPTS[0], video=_video(0), plan="uniform:keep=0.5", max_new_tokens=2)
    frames = res.frames
    assert frames.shape[0] == res.stats["visual_tokens"] and int(frames.min()) >= 0
    n_grid = 2 if native.startswith("qwen") or native == "glm4v" else 4  # Qwen, GLM-4V: temporal patches of two frames
    # (LLaVA-OneVision-1.5: the tower has no temporal patch, one grid frame per frame)
    assert int(frames.max()) + 1 == n_grid
    expected = torch.bincount(frames[res.kept[0]], minlength=n_grid).tolist()
    assert res.stats["tokens_per_frame"] == expected and sum(expected) == len(res.kept[0])
    assert res.stats["frame_times"] == [0.0, 0.25, 0.5, 0.75]
    assert torch.equal(res.coords[:, 0], frames)  # no images in the request: items are the frames


def test_qwen25_temporal_positions_follow_the_sampled_fps(engine_for):
    """Qwen2.5-VL: the temporal M-RoPE step is tokens_per_second * 2 / fps (second_per_grid_ts)."""
    engine = engine_for("qwen2_5_vl")
    slow = engine.prepare(PROMPTS[0], video=dict(_video(0), video_fps=1.0))
    fast = engine.prepare(PROMPTS[0], video=dict(_video(0), video_fps=4.0))
    assert torch.allclose(slow["second_per_grid_ts"].float(), torch.tensor([2.0]))
    assert torch.allclose(fast["second_per_grid_ts"].float(), torch.tensor([0.5]))
    pos_slow, pos_fast = engine.adapter.position_ids(slow), engine.adapter.position_ids(fast)
    vid = slow["input_ids"][0] == engine.model.config.video_token_id
    t_slow, t_fast = pos_slow[1, 0, vid], pos_fast[1, 0, vid]
    step = engine.model.config.vision_config.tokens_per_second
    assert int(t_slow.max() - t_slow.min()) == int(step * 2.0) and int(t_fast.max() - t_fast.min()) == int(step * 0.5)

"""Frames stages through the engine: the scoring passes against references computed here with plain
transformers / open_clip, the share-out per frame, images passing through, and bad plans."""
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import noise_image

PROMPT = "is there a red circle ?"  # words the tiny tokenizers know
QUESTION = "what appeared first"


def _frames(n=4):
    return [noise_image(20 + i) for i in range(n)]


def _quota_plan(keep=0.5, **extra):
    return [dict(pruner="quota", keep=keep, prompt=PROMPT, yes="yes", no="no", within="uniform", **extra)]


def _reference_p_yes(path: str, frames) -> torch.Tensor:
    """P("yes") of the first answer token, softmax over the whole vocabulary (QuoTA), one frame at a time."""
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    yes = proc.tokenizer.convert_tokens_to_ids("yes")
    out = []
    with torch.no_grad():
        for f in frames:
            logits = model(**proc(text=[text], images=[f], return_tensors="pt")).logits[0, -1].float()
            out.append(logits.softmax(-1)[yes])
    return torch.stack(out)


def _budgets(w: list[float], total: int, cap: list[int]) -> list[int]:
    """QuoTA's share-out made exact: total * w_t, a frame over its token count capped and the excess
    spread over the others by weight (repeated), then floors and the remainder by largest fraction."""
    fixed: dict[int, int] = {}
    while True:
        free = [t for t in range(len(w)) if t not in fixed]
        left = total - sum(fixed.values())
        raw = {t: left * w[t] / sum(w[u] for u in free) for t in free}
        over = [t for t in free if raw[t] > cap[t]]
        if not over:
            break
        fixed.update({t: cap[t] for t in over})
    budget = {**fixed, **{t: int(r) for t, r in raw.items()}}
    for t in sorted(raw, key=lambda t: (-(raw[t] - budget[t]), t)):
        if sum(budget.values()) == total:
            break
        if budget[t] < cap[t] and w[t] > 0:
            budget[t] += 1
    return [budget[t] for t in range(len(w))]


def _frame_share(res, stage=0) -> torch.Tensor:
    """The per-frame share a frames stage reported (its score of each frame's tokens)."""
    vid = res.frames >= 0
    frames, scores = res.frames[vid], res.scores[stage][vid]
    return torch.stack([scores[frames == t][0] for t in range(int(frames.max()) + 1)])


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_quota_rates_frames_as_plain_transformers_does(fam, engine_for, tiny_path):
    engine = engine_for(fam)
    frames = _frames()
    res = engine.generate(QUESTION, video=frames, plan=_quota_plan(), max_new_tokens=2)
    p = _reference_p_yes(tiny_path(fam), frames)
    if fam == "qwen2_vl":  # native video: a grid frame is a temporal patch of two frames; it gets the larger p
        p = torch.stack([p[0:2].max(), p[2:4].max()])
    w = (100 * p.double()) ** 2
    w = w / w.sum()
    torch.testing.assert_close(_frame_share(res).double(), w, atol=1e-5, rtol=1e-4)
    per_frame = torch.bincount(res.frames[res.frames >= 0]).tolist()
    assert res.stats["tokens_per_frame"] == _budgets([float(x) for x in w], round(0.5 * sum(per_frame)), per_frame)
    assert res.stats["scoring_flops"] > 0 and res.stats["scoring_s"] > 0


def test_keyscore_reads_clip_embeddings_of_frames_and_question(engine_for):
    open_clip = pytest.importorskip("open_clip")
    from tokensieve.eval.shapeworld import shipped
    from tokensieve.pruners import keyscore

    engine = engine_for("llava")
    frames = _frames(6)
    res = engine.generate(QUESTION, video=frames, plan="keyscore:keep=0.5,within=uniform", max_new_tokens=2)
    name = "local-dir:" + shipped.path("clip")
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        f = model.eval().encode_image(torch.stack([preprocess(x) for x in frames])).float()
        q = model.encode_text(tokenizer([QUESTION]))[0].float()
    expected = keyscore.score_weights(keyscore.keyscore(f, q))
    torch.testing.assert_close(_frame_share(res).double(), expected.double(), atol=1e-5, rtol=1e-4)
    assert res.stats["scoring_flops"] > 0


def test_images_pass_a_frames_stage_and_later_stages_compose(engine_for):
    engine = engine_for("llava")
    plan = _quota_plan(keep=0.25) + [dict(pruner="fastv", layer=2, keep=0.5)]
    res = engine.generate(QUESTION, images=[noise_image(1)], video=_frames(), plan=plan, max_new_tokens=2)
    image_tokens = (res.frames < 0).nonzero().flatten()
    assert image_tokens.numel() == 64 and set(image_tokens.tolist()) <= set(res.kept[0].tolist())
    assert len(res.kept[0]) == 64 + 64  # the image, plus 25% of the video's 256 tokens
    assert set(res.kept[1].tolist()) <= set(res.kept[0].tolist()) and len(res.kept[1]) == 64
    assert sum(res.stats["tokens_per_frame"]) == int((res.frames[res.kept[1]] >= 0).sum())


def test_resize_within_keeps_at_most_the_budget(engine_for):
    plan = [dict(_quota_plan(keep=0.3)[0], within="resize")]
    res = engine_for("llava").generate(QUESTION, video=_frames(), plan=plan, max_new_tokens=2)
    assert 0 < len(res.kept[0]) <= round(0.3 * 256)
    assert res.groups[0].max() == len(res.kept[0]) - 1  # resized cells stand for the tokens around them


def test_frames_stage_needs_a_video(engine_for):
    import tokensieve

    with pytest.raises(tokensieve.PlanError, match="needs a request with a video"):
        engine_for("llava").generate("what colour", images=[noise_image(0)], plan="quota:keep=0.5")


def test_frames_stage_budget_counts_the_videos_tokens(engine_for):
    import tokensieve

    with pytest.raises(tokensieve.PlanError, match="larger than the 256 visual tokens .*video"):
        engine_for("llava").generate(QUESTION, images=[noise_image(0)], video=_frames(), plan="quota:keep=300,yes=yes")


def test_importance_maps_per_frame(engine_for):
    from tokensieve.engine.maps import importance_maps

    res = engine_for("llava").generate(QUESTION, images=[noise_image(1)], video=_frames(), plan=_quota_plan(keep=0.25),
                                       max_new_tokens=1)
    maps = importance_maps(res)
    assert [m.frame for m in maps] == [-1, 0, 1, 2, 3]  # the image, then the video's four frames
    for m in maps[1:]:
        assert int(m.kept.sum()) == res.stats["tokens_per_frame"][m.frame]
        assert torch.allclose(m.score[m.present], m.score[m.present][0])  # a frame's share, on every token


def test_frames_spatial_and_temporal_stages_compose(engine_for):
    """quota, then DyCoke's temporal merge, then FastV: each stage's kept set inside the one before,
    merge groups composed through all three, everything in original coordinates."""
    engine = engine_for("qwen2_vl")
    frames = [noise_image(40 + i) for i in range(8)]
    plan = _quota_plan(keep=0.5) + [dict(pruner="dycoke", keep=0.5), dict(pruner="fastv", layer=2, keep=0.5)]
    res = engine.generate(QUESTION, video=frames, plan=plan, max_new_tokens=2)
    n = res.stats["visual_tokens"]
    k0, k1, k2 = res.kept
    assert len(k0) == round(0.5 * n) and len(k1) == round(0.5 * len(k0)) and len(k2) == round(0.5 * len(k1))
    assert set(k2.tolist()) <= set(k1.tolist()) <= set(k0.tolist())
    for g, k in zip(res.groups, res.kept):
        alive = g >= 0
        assert (k[g[alive]] >= 0).all() and set(g[alive].tolist()) == set(range(len(k)))
    assert sum(res.stats["tokens_per_frame"]) == len(k2) and len(res.stats["tokens_per_frame"]) == 4


def test_quota_refuses_an_answer_word_the_rater_cannot_say(engine_for):
    import tokensieve

    engine = engine_for("llava")
    with pytest.raises(tokensieve.PlanError, match="no token for the answer 'A'"):  # the tiny vocabulary has no "A"
        engine.generate(QUESTION, video=_frames(), plan="quota:keep=0.5", max_new_tokens=1)
    with pytest.raises(tokensieve.PlanError, match="no token for the answer 'A'"):  # a default plan: at load
        tokensieve.Engine(engine.model, engine.processor, plan="quota:keep=0.5")


def test_quota_with_another_checkpoint_as_rater_and_query_decoupling(engine_for, tiny_path):
    """scorer=PATH rates with that checkpoint (QuoTA's small separate VLM); decouple=True first asks the
    rater for the question's objects (the tiny rater's answer does not parse: the question prompt is used)."""
    engine, rater = engine_for("llava"), tiny_path("qwen2_vl")
    frames = _frames()
    res = engine.generate(QUESTION, video=frames, plan=_quota_plan(scorer=rater), max_new_tokens=1)
    p = _reference_p_yes(rater, frames)
    w = (100 * p.double()) ** 2
    torch.testing.assert_close(_frame_share(res).double(), w / w.sum(), atol=1e-5, rtol=1e-4)
    plain = engine.generate(QUESTION, video=frames, plan=_quota_plan(), max_new_tokens=1)
    decoupled = engine.generate(QUESTION, video=frames, plan=_quota_plan(decouple=True, decouple_tokens=4),
                                max_new_tokens=1)
    torch.testing.assert_close(_frame_share(decoupled), _frame_share(plain))  # nothing parsed: same prompt
    assert decoupled.stats["scoring_flops"] > plain.stats["scoring_flops"]  # the decoupling pass is counted


def test_scoring_time_is_reported_apart_from_the_prefill(engine_for, monkeypatch):
    import time

    from tokensieve.pruners.keyscore import ClipScorer  # the CLIP pass (was engine.frames._clip)

    real = ClipScorer.score

    def slow(*args):  # a scoring pass that takes 0.5 s
        time.sleep(0.5)
        return real(*args)

    monkeypatch.setattr(ClipScorer, "score", slow)
    res = engine_for("llava").generate(QUESTION, video=_frames(6), plan="keyscore:keep=0.5", max_new_tokens=1)
    assert res.stats["scoring_s"] >= 0.5 and 0 < res.stats["prefill_s"] < 0.4

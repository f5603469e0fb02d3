"""Frames pruners (`quota`, `keyscore`) and their shared machinery (`pruners/frame_budget.py`), against
references written here: QuoTA's budget rule by hand and by loop, its resize against
``torch.nn.functional.interpolate``, the answer parsing and P(yes) on hand-made inputs, KeyScore's
documented formula in plain Python."""
import math

import pytest
import torch
import torch.nn.functional as F

from tokensieve import PlanError
from tokensieve.engine.plan import Plan
from tokensieve.engine.state import check_selection
from tokensieve.pruners import StageInput, get_pruner
from tokensieve.pruners.frame_budget import allocate_budgets, resize_frame, resize_shape
from tokensieve.pruners.keyscore import keyscore, score_weights
from tokensieve.pruners.quota import (DECOUPLING_PROMPT, OBJECT_RATING_PROMPT, QUESTION_RATING_PROMPT,
                                      decoupling_prompt, parse_objects, quota_weights, rating_prompt,
                                      yes_probability)


def video_coords(n_frames: int, h: int, w: int) -> torch.Tensor:
    """[T*h*w, 3] (frame, row, col), frame by frame in raster order."""
    f = torch.arange(n_frames).repeat_interleave(h * w)
    r = torch.arange(h).repeat_interleave(w).repeat(n_frames)
    c = torch.arange(w).repeat(h * n_frames)
    return torch.stack([f, r, c], dim=1)


def ref_budgets(w: list[float], total: int, cap: list[int]) -> list[int]:
    """The documented rule in plain Python: floor(left * w_i / sum w) over the frames of positive weight,
    capped frames fixed at their capacity and the rest re-spread (repeat), then the leftover one each by
    largest fractional part (ties: lower index) to frames with room."""
    n = len(w)
    active = [i for i in range(n) if w[i] > 0 and cap[i] > 0]
    capped, q = set(), {}
    while True:
        free = [i for i in active if i not in capped]
        left = total - sum(cap[i] for i in capped)
        if not free or left <= 0:
            q = {}
            break
        s = sum(w[i] for i in free)
        q = {i: left * (w[i] / s) for i in free}
        over = [i for i in free if q[i] > cap[i]]
        if not over:
            break
        capped |= set(over)
    out = [0] * n
    for i in active:
        out[i] = cap[i] if i in capped else min(math.floor(q.get(i, 0.0)), cap[i])
    rest = min(total, sum(cap[i] for i in active)) - sum(out)
    room = sorted((i for i in active if i not in capped and out[i] < cap[i]), key=lambda i: (-(q[i] - out[i]), i))
    while rest > 0 and room:
        for i in room[:rest]:
            out[i] += 1
        rest -= min(rest, len(room))
        room = [i for i in room if out[i] < cap[i]]
    return out


# ---- allocation ---------------------------------------------------------------------------------

def test_quota_allocation_by_hand():
    p = torch.tensor([0.9, 0.1, 0.5, 0.0])
    w = quota_weights(p)  # (100 p)^2 = 8100, 100, 2500, 0 over 10700
    torch.testing.assert_close(w, torch.tensor([8100, 100, 2500, 0], dtype=torch.float64) / 10700)
    # official int(100 * w_i): 75 (75.70), 0 (0.93), 23 (23.36), 0 -> 98; the 2 left over go to the largest
    # fractional parts, frame 1 (.93) then frame 0 (.70)
    assert [int(100 * float(v)) for v in w] == [75, 0, 23, 0]
    b = allocate_budgets(w, 100, torch.tensor([196] * 4))
    assert b.tolist() == [76, 1, 23, 0] and int(b.sum()) == 100
    # caps at 64: frame 0 is fixed at 64, the other 36 split 100 : 2500 -> 1.38, 34.62 -> 1, 34 (+1 to frame 2)
    b = allocate_budgets(w, 100, torch.tensor([64] * 4))
    assert b.tolist() == [64, 1, 35, 0] and int(b.sum()) == 100
    # not enough room in the frames of positive weight: each full, the p=0 frame still dropped
    assert allocate_budgets(w, 1000, torch.tensor([64] * 4)).tolist() == [64, 64, 64, 0]
    # all weights 0: every frame weighs the same
    assert allocate_budgets(torch.zeros(4), 10, torch.tensor([64] * 4)).tolist() == [3, 3, 2, 2]


@pytest.mark.parametrize("seed", range(12))
def test_allocation_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 12, (1,), generator=g))
    w = torch.randint(0, 50, (n,), generator=g).double() ** 2
    cap = torch.randint(0, 200, (n,), generator=g)
    total = int(torch.randint(1, 1500, (1,), generator=g))
    b = allocate_budgets(w, total, cap)
    w_ref = w.tolist() if float(w.sum()) > 0 else [1.0] * n  # all 0: every frame weighs the same
    assert b.tolist() == ref_budgets(w_ref, total, cap.tolist())
    live = (w > 0) & (cap > 0) if float(w.sum()) > 0 else cap > 0
    assert int(b.sum()) == min(total, int(cap[live].sum()))
    assert bool((b <= cap).all()) and bool((b[~live] == 0).all())


# ---- the resize step ----------------------------------------------------------------------------

def official_shape(cur_token: int) -> tuple[int, int]:
    """core/llava_arch.py::token_compress (v1), square grids."""
    th = tw = int(math.sqrt(cur_token))
    if th * tw < cur_token:
        if (th + 1) * tw <= cur_token:
            th += 1
        elif th * (tw + 1) <= cur_token:
            tw += 1
    return th, tw


def test_resize_shape_is_the_official_rule_on_square_grids():
    for side in (8, 14, 27):
        for b in range(1, side * side + 1):
            assert resize_shape(side, side, b) == official_shape(b)
    for h, w in ((6, 10), (1, 40), (12, 5)):
        for b in range(1, h * w + 1):
            th, tw = resize_shape(h, w, b)
            assert 1 <= th <= h and 1 <= tw <= w and th * tw <= b


@pytest.mark.parametrize("side,budget", [(14, 50), (14, 196), (14, 30), (8, 20), (8, 9), (8, 1)])
def test_resize_against_interpolate(side, budget):
    g = torch.Generator().manual_seed(side * 1000 + budget)
    d = 6
    x = torch.randn(side * side, d, generator=g)
    coords = video_coords(1, side, side)
    th, tw = official_shape(budget)
    expected = F.interpolate(x.T.reshape(1, d, side, side), size=(th, tw), mode="bilinear", align_corners=False)
    expected = expected.reshape(d, th * tw).T
    keep_idx, tokens, groups = resize_frame(x, coords, budget)
    # each output cell at the token holding its centre, in raster order
    slots = [math.floor((i + 0.5) * side / th) * side + math.floor((j + 0.5) * side / tw)
             for i in range(th) for j in range(tw)]
    assert keep_idx.tolist() == slots
    torch.testing.assert_close(tokens, expected)
    # every token -> the output cell with the nearest centre
    centres = torch.tensor([[(i + 0.5) * side / th, (j + 0.5) * side / tw] for i in range(th) for j in range(tw)])
    for k in range(side * side):
        r, c = divmod(k, side)
        dist = ((centres - torch.tensor([r + 0.5, c + 0.5])) ** 2).sum(1)
        assert int(groups[k]) == int(dist.argmin())
    assert groups[keep_idx].tolist() == list(range(th * tw))


def test_select_resize_one_frame_is_interpolate():
    x = torch.randn(196, 8)
    coords = video_coords(1, 14, 14)
    sel = get_pruner("quota").select(StageInput(tokens=x, keep=50, coords=coords, frames=coords[:, 0],
                                                frame_relevance=torch.tensor([0.7])))
    expected = F.interpolate(x.T.reshape(1, 8, 14, 14), size=(7, 7), mode="bilinear").reshape(8, 49).T
    assert sel.keep_idx.numel() == 49  # 7 x 7 <= 50: a resize stage keeps at most keep
    torch.testing.assert_close(sel.tokens, expected)


# ---- the stage ------------------------------------------------------------------------------------

def stage_input(n_frames, side, keep, seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    coords = video_coords(n_frames, side, side)
    p = torch.rand(n_frames, generator=g)
    p[2] = 0.0  # a frame the rater finds irrelevant
    return StageInput(tokens=torch.randn(coords.shape[0], 12, generator=g), keep=keep, coords=coords,
                      frames=coords[:, 0].clone(), frame_relevance=p,
                      frame_embeds=torch.randn(n_frames, 16, generator=g),
                      text_embed=torch.randn(16, generator=g), keys=torch.randn(coords.shape[0], 4, generator=g),
                      sizes=torch.ones(coords.shape[0]), options=options)


def expected_budgets(name, inp):
    n_frames = int(inp.frames.max()) + 1
    cap = torch.bincount(inp.frames, minlength=n_frames)
    if name == "quota":
        p = inp.frame_relevance.double()
        w = (100 * p) ** 2
    else:
        w = score_weights(keyscore(inp.frame_embeds, inp.text_embed))
    return torch.tensor(ref_budgets(w.tolist(), inp.keep, cap.tolist()))


@pytest.mark.parametrize("name", ["quota", "keyscore"])
@pytest.mark.parametrize("side", [8, 14])
@pytest.mark.parametrize("within", ["resize", "uniform", "divprune", "tome", "cls"])
def test_select_kept_sets_and_groups(name, side, within):
    n = 8 * side * side
    keep = n // 6
    inp = stage_input(8, side, keep, seed=side, within=within)
    sel = get_pruner(name).select(inp)
    check_selection(sel, n, keep, "frames", at_most=within == "resize")
    budgets = expected_budgets(name, inp)
    frames_of_kept = inp.frames[sel.keep_idx]
    per_frame = torch.bincount(frames_of_kept, minlength=8)
    if within == "resize":
        assert per_frame.tolist() == [math.prod(resize_shape(side, side, int(b))) if b else 0 for b in budgets]
    else:
        assert per_frame.tolist() == budgets.tolist() and sel.keep_idx.numel() == keep
    assert bool((budgets[frames_of_kept] > 0).all())
    if name == "quota":
        assert per_frame[2] == 0  # p = 0: dropped whole
    if sel.groups is not None:
        assert sel.groups[sel.keep_idx].tolist() == list(range(sel.keep_idx.numel()))
        member = sel.groups >= 0
        assert torch.equal(inp.frames[member], inp.frames[sel.keep_idx[sel.groups[member]]])  # merged within a frame
        assert bool((sel.groups[budgets[inp.frames] == 0] == -1).all())
        assert sel.tokens is not None and sel.tokens.shape == (sel.keep_idx.numel(), 12)
    if name == "quota":
        w = quota_weights(inp.frame_relevance)
    else:
        w = score_weights(keyscore(inp.frame_embeds, inp.text_embed))
    torch.testing.assert_close(sel.scores.double(), (w / w.sum())[inp.frames])
    again = get_pruner(name).select(stage_input(8, side, keep, seed=side, within=within))
    assert torch.equal(again.keep_idx, sel.keep_idx)


def test_within_uniform_is_uniform_frame_by_frame():
    inp = stage_input(8, 8, 100, seed=3, within="uniform")
    sel = get_pruner("quota").select(inp)
    budgets = allocate_budgets(quota_weights(inp.frame_relevance), 100, torch.full((8,), 64))
    expected = []
    for t in range(8):
        if budgets[t] == 0:
            continue
        idx = (inp.frames == t).nonzero().flatten()
        c = inp.coords[idx].clone()
        c[:, 0] = 0
        k = get_pruner("uniform").select(StageInput(tokens=inp.tokens[idx], keep=int(budgets[t]), coords=c)).keep_idx
        expected += idx[k].tolist()
    assert sel.keep_idx.tolist() == sorted(expected)
    assert sel.tokens is None and sel.groups is None


def test_without_signals_every_frame_weighs_the_same():
    coords = video_coords(4, 8, 8)
    for name in ("quota", "keyscore"):
        sel = get_pruner(name).select(StageInput(tokens=torch.randn(256, 4), keep=64, coords=coords,
                                                 options={"within": "uniform"}))
        assert torch.bincount(coords[sel.keep_idx, 0], minlength=4).tolist() == [16, 16, 16, 16]


def test_within_must_be_a_spatial_pruner():
    for bad in ("fastv", "quota", "nosuch"):
        with pytest.raises(PlanError):
            get_pruner("quota").select(stage_input(8, 8, 100, within=bad))


def test_plans_accept_the_frames_pruners():
    plan = Plan.parse("quota:keep=0.25,within=uniform,decouple=true;keyscore:keep=0.5,weights=0.5/0.25/0.25")
    assert [(s.pruner, s.where) for s in plan.stages] == [("quota", "frames"), ("keyscore", "frames")]
    assert get_pruner("quota").frame_signal == "relevance" and get_pruner("keyscore").frame_signal == "clip"
    with pytest.raises(PlanError, match="unknown option"):
        Plan.parse("quota:keep=0.25,bogus=1")
    with pytest.raises(PlanError, match="cannot act at"):
        Plan.parse("quota:keep=0.25,where=pre_llm")


# ---- QuoTA's prompts and parsing ------------------------------------------------------------

def test_prompts():
    assert rating_prompt("Why?", ["red car", "dog"]) == (
        "Does the image contain any object of red car, dog? A. yes, B. no\nAnswer with the option's letter directly.")
    assert rating_prompt("Why?", None) == ("Why?\nDoes the image contain sufficient information to answer the "
                                           "given question? A. yes, B. no\nAnswer with the option's letter directly.")
    assert rating_prompt("Why?", []) == rating_prompt("Why?", None)
    assert rating_prompt("Why?", None, "Q: {question}") == "Q: Why?"
    assert rating_prompt("Why?", ["a"], "Q: {question}", "has {objects}?") == "has a?"
    d = decoupling_prompt("What is the man doing?")
    assert d.startswith("What is the man doing?\nTo answer this question, please follow the following step")
    assert d.endswith("    Your output should be:\n    Step 1: no") and d.count("Step 3:") == 3
    assert decoupling_prompt("Q", "{question} list objects") == "Q list objects"
    assert "{objects}" in OBJECT_RATING_PROMPT and "{question}" in QUESTION_RATING_PROMPT
    assert "{question}" in DECOUPLING_PROMPT


@pytest.mark.parametrize("answer,objects", [
    ('Step 1: yes\nStep 2: ["man", "bed", "video"]\nStep 3: ["man", "bed"]', ["man", "bed"]),
    ('step 1: Yes\nstep 2: ["The Man in Black"]\nSTEP 3: ["The Man in Black", "woman"]', ["the man in black", "woman"]),
    ("Step 1: yes\nStep 2: ['cup']\nStep 3: ['cup', 'cup', ' ']", ["cup"]),
    ("Step 1: no", []),
    ('Step 1: no\nStep 3: ["man"]', []),
    ("Step 1: yes\nStep 2: []\nStep 3: null", []),
    ("Step 1: yes\nStep 3: []", []),
    ("Step 1: yes\nStep 3: [man, bed]", ["man", "bed"]),
    ('Step 1: yes\nStep 3: ["unterminated', []),
    ("I cannot help with that.", []),
    ("", []),
    ('Step 1: yes Step 3: [1, 2, "ball"]', ["ball"]),
])
def test_parse_objects(answer, objects):
    assert parse_objects(answer) == objects


def test_yes_probability():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5],
                           [0.0, 3.0, 0.0, 0.0, 0.0]])
    z = [sum(math.exp(v) for v in row) for row in logits.tolist()]
    p = yes_probability(logits, [0], [1])  # official: the full-vocabulary softmax at "A"
    torch.testing.assert_close(p, torch.tensor([math.exp(2) / z[0], 1 / z[1]]))
    p2 = yes_probability(logits, [0, 4], [1])  # "A" and " A"
    torch.testing.assert_close(p2, torch.tensor([(math.exp(2) + math.exp(0.5)) / z[0], 2 / z[1]]))
    pair = yes_probability(logits, [0], [1], mode="pair")
    torch.testing.assert_close(pair, torch.tensor([math.exp(2) / (math.exp(2) + 1), 1 / (1 + math.exp(3))]))


# ---- KeyScore's formula ------------------------------------------------------------------------

def ref_keyscore(frames, text, weights=(1 / 3, 1 / 3, 1 / 3), window=2, temporal="representative"):
    def norm(v):
        s = math.sqrt(sum(a * a for a in v))
        return [a / s for a in v]

    def dot(u, v):
        return sum(a * b for a, b in zip(u, v))

    def minmax(xs):
        lo, hi = min(xs), max(xs)
        return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in xs]

    f = [norm(v) for v in frames]
    q = norm(text)
    n = len(f)
    sem = [dot(fi, q) for fi in f]
    temp = []
    for i in range(n):
        nb = [dot(f[i], f[j]) for j in range(n) if j != i and abs(i - j) <= window]
        m = sum(nb) / len(nb) if nb else 0.0
        temp.append(1 - m if nb and temporal == "distinct" else m)
    drop = []
    for i in range(n):
        if n == 1:
            drop.append(0.0)
            continue
        v = [sum(f[j][e] for j in range(n)) / n for e in range(len(q))]
        v_i = [sum(f[j][e] for j in range(n) if j != i) / (n - 1) for e in range(len(q))]
        drop.append(dot(norm(v), q) - dot(norm(v_i), q))
    a, b, c = weights
    return [a * s + b * t + c * d for s, t, d in zip(minmax(sem), minmax(temp), minmax(drop))]


@pytest.mark.parametrize("n,window,temporal,weights", [(8, 2, "representative", (1 / 3, 1 / 3, 1 / 3)),
                                                       (6, 1, "distinct", (0.5, 0.25, 0.25)),
                                                       (5, 10, "representative", (1.0, 0.0, 2.0)),
                                                       (1, 2, "representative", (1 / 3, 1 / 3, 1 / 3))])
def test_keyscore_matches_plain_formula(n, window, temporal, weights):
    g = torch.Generator().manual_seed(n)
    frames, text = torch.randn(n, 7, generator=g), torch.randn(7, generator=g)
    got = keyscore(frames, text, weights, window, temporal)
    expected = ref_keyscore(frames.double().tolist(), text.double().tolist(), weights, window, temporal)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_keyscore_weights():
    s = torch.tensor([0.2, 1.0, 0.6, 0.0])
    torch.testing.assert_close(score_weights(s, 0.5), torch.softmax(s.double() / 0.5, 0))
    w = score_weights(s, 0.2, keyframes=2)
    assert w[0] == 0 and w[3] == 0 and w[1] > w[2] > 0
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    # the frame that matches the text best gets the largest share
    text = torch.tensor([1.0, 0.0, 0.0])
    frames = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0], [0.1, 1.0, 0.2]])
    assert int(keyscore(frames, text).argmax()) == 1

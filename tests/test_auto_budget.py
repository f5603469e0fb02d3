"""``keep=auto`` for every pruner (issue 44): the budget rules against plain references written here, the
bounds, the stats, each bad plan refused before any model work, padded batches with different per-request
budgets against one request at a time (shipped tiny-llava and tiny-qwen2-vl; divprune before the LLM, fastv
inside it, a video with the per-frame rule), and the plan through the Python API, ``tokensieve run`` and
``tokensieve eval``."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import tokensieve
from conftest import model_calls
from tokensieve import Plan, PlanError, shipped
from tokensieve.engine import budget
from tokensieve.eval.shapeworld import world
from tokensieve.pruners import REGISTRY, get_pruner

MODELS = ("tiny-llava", "tiny-qwen2-vl")
QUESTION = "what colour is the circle ?"


# ---- independent references ---------------------------------------------------------------------------

def ref_mass(scores, mass):
    """The fewest tokens whose normalised scores reach ``mass``: a plain loop over the sorted scores."""
    s = [0.0 if not math.isfinite(v) else v for v in scores.tolist()]
    low = min(s)
    if low < 0:
        s = [v - low for v in s]
    total = sum(s)
    p = sorted((v / total if total > 0 else 1 / len(s) for v in s), reverse=True)
    acc = 0.0
    for k, v in enumerate(p, 1):
        acc += v
        if acc >= mass - 1e-6:
            return k, acc
    return len(p), acc


def _cos_dist(a, b):
    a, b = a.detach().double(), b.detach().double()
    return 1.0 - float(torch.dot(a, b) / (a.norm() * b.norm()))


def ref_redundancy(x, tau):
    """Brute-force greedy farthest-point order on the cosine distance, stopped below ``tau`` -> (k, gap, chosen)."""
    n = x.shape[0]
    d = [[_cos_dist(x[i], x[j]) for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda i: (min(d[i][j] for j in range(n) if j != i), -i))
    chosen = [first]
    while len(chosen) < n:
        gaps = {i: min(d[i][j] for j in chosen) for i in range(n) if i not in chosen}
        nxt = max(gaps, key=lambda i: (gaps[i], -i))
        if gaps[nxt] < tau:
            return len(chosen), gaps[nxt], chosen
        chosen.append(nxt)
    return n, 0.0, chosen


def ref_frames(x, coords, frames, tau):
    """Per frame: the image rule on the first frame, then the tokens whose cosine similarity to the same
    (row, col) in the frame before is below 1 - tau (a position missing there counts as new)."""
    order = sorted({int(f) for f in frames.tolist() if f >= 0})
    at = {(int(frames[i]), int(coords[i, 1]), int(coords[i, 2])): x[i] for i in range(x.shape[0])}
    per_frame = []
    for j, f in enumerate(order):
        idx = [i for i in range(x.shape[0]) if int(frames[i]) == f]
        if j == 0:
            per_frame.append(ref_redundancy(x[idx], tau)[0])
            continue
        new = 0
        for i in idx:
            prev = at.get((order[j - 1], int(coords[i, 1]), int(coords[i, 2])))
            new += prev is None or 1.0 - _cos_dist(x[i], prev) < 1.0 - tau
        per_frame.append(new)
    return sum(per_frame), per_frame


# ---- the rules --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mass", [0.05, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("kind", ["positive", "signed", "peaked"])
def test_mass_rule_matches_sorted_cumulative_sum(mass, kind):
    g = torch.Generator().manual_seed(1)
    s = {"positive": torch.rand(50, generator=g), "signed": torch.randn(50, generator=g),
         "peaked": torch.softmax(4 * torch.randn(50, generator=g), 0)}[kind]
    k, reached = budget.mass_budget(s, mass)
    want_k, want_reached = ref_mass(s, mass)
    assert k == want_k and reached == pytest.approx(want_reached, abs=1e-9)
    assert reached >= mass - 1e-6


@pytest.mark.parametrize("tau", [0.05, 0.3, 0.8, 1.5])
def test_redundancy_rule_matches_brute_force_farthest_point(tau):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g).repeat_interleave(5, 0) + 0.3 * torch.randn(30, 5, generator=g)  # clusters
    k, gap = budget.redundancy_budget(x, tau)
    want_k, want_gap, _ = ref_redundancy(x, tau)
    assert k == want_k and gap == pytest.approx(want_gap, abs=1e-5)


def test_redundancy_rule_counts_the_distinct_tokens():
    x = torch.eye(4).repeat(6, 1)  # 24 tokens, 4 distinct directions
    assert budget.redundancy_budget(x, 0.5)[0] == 4
    assert budget.redundancy_budget(x, 2.0)[0] == 1


def test_divprune_keeps_the_redundancy_rules_set():
    """DivPrune's own greedy order is the rule's: at the rule's budget it keeps exactly the tokens the rule
    counted (the reference's first k)."""
    from tokensieve.engine.adapters.base import grid_coords
    from tokensieve.pruners import StageInput
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 6, generator=g)
    k, _, chosen = ref_redundancy(x, 0.6)
    assert 1 < k < 24 and budget.redundancy_budget(x, 0.6)[0] == k
    sel = get_pruner("divprune").select(StageInput(tokens=x, keep=k, coords=grid_coords(4, 6)))
    assert sel.keep_idx.tolist() == sorted(chosen)


@pytest.mark.parametrize("tau", [0.02, 0.2, 0.6])
def test_per_frame_rule_matches_a_loop_over_grid_positions(tau):
    g = torch.Generator().manual_seed(4)
    t, rows, cols = 4, 3, 4
    base = torch.randn(rows * cols, 8, generator=g)
    xs, coords, frames = [], [], []
    for f in range(t):  # frame 1 almost repeats frame 0; frame 2 changes half the grid; frame 3 lacks a position
        x = base + (0.02 if f == 1 else 0.0) * torch.randn(rows * cols, 8, generator=g)
        if f == 2:
            x[: rows * cols // 2] = torch.randn(rows * cols // 2, 8, generator=g)
        base = x
        for p in range(rows * cols):
            if f == 3 and p == 5:
                continue
            xs.append(x[p])
            coords.append([f, p // cols, p % cols])
            frames.append(f)
    x, coords, frames = torch.stack(xs), torch.tensor(coords), torch.tensor(frames)
    k, _, per_frame = budget.frame_redundancy_budget(x, coords, frames, tau)
    want_k, want_per_frame = ref_frames(x, coords, frames, tau)
    assert (k, per_frame) == (max(want_k, 1), want_per_frame)


@pytest.mark.parametrize("k, lo, hi, want", [
    (10, None, None, (10, None)), (3, 8, None, (8, "min")), (90, None, 32, (32, "max")),
    (3, 0.25, None, (25, "min")), (90, None, 0.5, (50, "max")), (40, 16, 0.5, (40, None)),
    (3, 200, None, (100, "min")), (3, 60, 0.5, (50, "min")),  # bounds within [1, N]; max wins where they cross
])
def test_bounds_always_hold(k, lo, hi, want):
    assert budget.bound(k, 100, lo, hi) == want


def test_every_pruner_declared_scored_gives_scores_at_keep_all():
    from test_pruners import N, full_input, run
    for name, cls in sorted(REGISTRY.items()):
        sel = run(name, full_input(N))
        if cls.scored:
            assert sel.scores is not None and sel.scores.shape == (N,), name


# ---- plans ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["divprune:keep=auto,tau=0.2", "fastv:layer=2,keep=auto,mass=0.9,min=4,max=0.5",
                                  "prumerge:keep=auto", "prumerge:keep=auto,mass=0.8", "tome:keep=auto,tau=0.3,min=0.1",
                                  "fastvid:keep=auto,budget_tau=0.3,tau=0.8", "quota:keep=auto,mass=0.7",
                                  "divprune:keep=auto,tau=0.2;fastv:layer=2,keep=auto,mass=0.9"])
def test_auto_plans_parse_and_round_trip(spec):
    plan = Plan.parse(spec)
    assert Plan.parse(str(plan)) == plan and all(s.budget is not None for s in plan.stages)
    if "fastvid" in spec:  # FastVID's own tau is its option; the budget's is budget_tau
        assert plan.stages[0].options["tau"] == 0.8 and plan.stages[0].budget.value == 0.3


@pytest.mark.parametrize("spec, words", [
    ("divprune:keep=auto,mass=0.9", "gives no token scores"),
    ("fastv:layer=2,keep=auto,mass=0", "mass must be in (0, 1]"),
    ("fastv:layer=2,keep=auto,mass=1.5", "mass must be in (0, 1]"),
    ("divprune:keep=auto,tau=0", "tau must be in (0, 2]"),
    ("divprune:keep=auto,tau=2.5", "tau must be in (0, 2]"),
    ("divprune:keep=auto,tau=0.2,min=32,max=16", "min=32 is above max=16"),
    ("divprune:keep=auto,tau=0.2,min=0.5,max=0.25", "min=0.5 is above max=0.25"),
    ("divprune:keep=auto,tau=0.2,min=0", "min must be a count >= 1 or a ratio"),
    ("divprune:keep=auto,tau=0.2,max=1.5", "max must be a count >= 1 or a ratio"),
    ("divprune:keep=16,tau=0.2", "give keep=auto with it"),
    ("fastv:layer=2,keep=0.5,mass=0.9", "give keep=auto with it"),
    ("fastv:layer=2,keep=auto,mass=0.9,tau=0.2", "not both"),
    ("divprune:keep=auto", "or a budget rule"),
    ("fastvid:keep=auto,tau=0.8", "or a budget rule"),
    ("flowcut:where=vision,keep=auto,mass=0.5", "vision-tower stage"),  # progressive: no per-image budgets
    ("divprune:keep=auto,tau=x", "tau must be a number"),
])
def test_bad_auto_plans_are_one_clear_error(spec, words):
    with pytest.raises(PlanError, match="stage 0 .*" + words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        Plan.parse(spec)


def test_a_bad_auto_plan_stops_before_any_model_work():
    with tokensieve.load(shipped.path("tiny-llava")) as engine, model_calls(engine) as calls:
        with pytest.raises(PlanError, match="gives no token scores"):
            engine.generate(QUESTION, images=[_images(1)[0]], plan="divprune:keep=auto,mass=0.9")
        assert calls == []


# ---- through the engine -------------------------------------------------------------------------------

def _images(n, seed=3):
    rng = random.Random(seed)
    return [world.render(world.random_scene(rng, size=64)) for _ in range(n)]


def _videos(n, seed=6):
    rng = random.Random(seed)
    return [[world.render(s) for s in world.random_video(rng, n_frames=8, size=64).frames] for _ in range(n)]


@pytest.fixture(scope="module", params=MODELS)
def engine(request):
    with tokensieve.load(shipped.path(request.param)) as e:
        yield e


def test_stats_report_the_mass_budget_of_the_scores(engine):
    res = engine.generate(QUESTION, images=_images(1), plan="fastv:layer=1,keep=auto,mass=0.7", max_new_tokens=1)
    (rec,) = res.stats["budgets"]
    k, reached = ref_mass(res.scores[0], 0.7)  # fastv's scores of the stage's tokens, the rule's input
    assert (rec["stage"], rec["pruner"], rec["rule"], rec["value"]) == (0, "fastv", "mass", 0.7)
    assert rec["budget"] == rec["kept"] == k == len(res.kept[0]) and rec["clipped"] is None
    assert rec["entering"] == res.stats["visual_tokens"] and rec["reached"] == pytest.approx(reached, abs=1e-5)


def test_stats_report_the_redundancy_budget_of_the_tokens(engine):
    images = _images(1)
    res = engine.generate(QUESTION, images=images, plan="divprune:keep=auto,tau=0.3", max_new_tokens=1)
    (rec,) = res.stats["budgets"]
    feats = engine.adapter.encode_images(engine._device_inputs(engine.prepare(QUESTION, images=images)))[0]
    k, gap, _ = ref_redundancy(feats.float(), 0.3)  # the projected features entering the pre-LLM stage
    assert (rec["rule"], rec["budget"], rec["kept"]) == ("tau", k, k) and len(res.kept[0]) == k
    assert rec["reached"] == pytest.approx(gap, abs=1e-4)


def test_a_bound_clips_and_says_so(engine):
    res = engine.generate(QUESTION, images=_images(1), plan="divprune:keep=auto,tau=0.3,max=5", max_new_tokens=1)
    (rec,) = res.stats["budgets"]
    assert rec["budget"] > 5 and rec["kept"] == 5 == len(res.kept[0]) and rec["clipped"] == "max"
    res = engine.generate(QUESTION, images=_images(1), plan="prumerge:keep=auto,min=0.5,max=0.5", max_new_tokens=1)
    (rec,) = res.stats["budgets"]  # PruMerge's own IQR rule, then the bounds: exactly half, whatever it chose
    assert rec["rule"] == "own" and rec["budget"] != 32 and rec["kept"] == 32 == len(res.kept[0])
    assert rec["clipped"] == ("min" if rec["budget"] < 32 else "max")


def test_plans_without_auto_report_no_budgets(engine):
    assert "budgets" not in engine.generate(QUESTION, images=_images(1), plan="divprune:keep=8", max_new_tokens=1).stats


def _same_as_alone(engine, reqs):
    batched = engine.generate_batch(reqs, output_logits=True)
    budgets = [tuple(r["kept"] for r in res.stats["budgets"]) for res in batched]
    assert len(set(budgets)) > 1, budgets  # the requests really got different budgets
    for req, res in zip(reqs, batched):
        one = engine.generate_batch([req], output_logits=True)[0]
        assert res.token_ids == one.token_ids
        assert [k.tolist() for k in res.kept] == [k.tolist() for k in one.kept]
        for got, alone in zip(res.stats["budgets"], one.stats["budgets"], strict=True):  # reached: float sums
            assert got.pop("reached") == pytest.approx(alone.pop("reached"), abs=1e-5) and got == alone
        torch.testing.assert_close(res.logits, one.logits, atol=2e-4, rtol=1e-4)
        assert res.stats["batch_size"] == len(reqs) and one.stats["batch_size"] == 1
    return batched


@pytest.mark.parametrize("plan", ["divprune:keep=auto,tau=0.3", "fastv:layer=1,keep=auto,mass=0.5",
                                  "divprune:keep=auto,tau=0.3;fastv:layer=2,keep=auto,mass=0.8"])
def test_padded_batch_with_different_budgets_equals_one_at_a_time(engine, plan):
    questions = [QUESTION, "how many objects are there ?", "is there a red square ?"]
    reqs = [dict(prompt=q, images=[im], plan=plan, max_new_tokens=4) for q, im in zip(questions, _images(3))]
    _same_as_alone(engine, reqs)


def test_padded_video_batch_with_the_per_frame_rule_equals_one_at_a_time(engine):
    reqs = [dict(prompt="what appeared first ?", video=v, plan="divprune:keep=auto,tau=0.2", max_new_tokens=4)
            for v in _videos(2)]
    for res in _same_as_alone(engine, reqs):
        (rec,) = res.stats["budgets"]
        assert rec["rule"] == "tau-frames" and sum(rec["per_frame"]) == rec["kept"] == len(res.kept[0])
        assert len(rec["per_frame"]) == len(res.stats["tokens_per_frame"])


# ---- everywhere a plan goes ---------------------------------------------------------------------------

def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tokensieve", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def test_cli_run_reports_the_budgets(tmp_path):
    path = str(tmp_path / "scene.png")
    _images(1)[0].save(path)
    plan = "divprune:keep=auto,tau=0.3,max=0.5"
    out = _cli("run", "--image", path, "--prompt", QUESTION, "--plan", plan, "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)["results"]
    (rec,) = row["budgets"]
    assert rec["rule"] == "tau" and rec["kept"] == row["kept_tokens"] == len(row["kept"][0])
    out = _cli("run", "--image", path, "--prompt", QUESTION, "--plan", plan, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"budget: divprune:where=pre_llm,keep=auto,tau=0.3,max=0.5 stage 0 divprune tau=0.3 -> {rec['kept']} of " \
           f"{rec['entering']} tokens" in out.stdout
    out = _cli("run", "--image", path, "--prompt", QUESTION, "--plan", "divprune:keep=auto,mass=0.9", cwd=tmp_path)
    assert out.returncode == 2 and "gives no token scores" in out.stderr


def test_cli_help_and_pruners_explain_auto():
    assert "keep=auto" in _cli("run", "--help").stdout
    listing = _cli("pruners").stdout
    assert "keep=auto,tau=T" in listing and "keep=auto,mass=M" in listing


def test_eval_records_each_samples_budget(tmp_path):
    pytest.importorskip("av")
    from tokensieve.eval.shapeworld import dataset
    from tokensieve.eval.videoqa import command as videoqa

    data = dataset.write_dataset(str(tmp_path / "world"), n_images=0, n_videos=2, seed=20_000, size=64, progress=False)
    out = tmp_path / "run"
    assert videoqa.main(["--data", data, "--out", str(out), "--plan", "divprune:keep=auto,tau=0.2",
                         "--batch-size", "2"]) == 0
    recs = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    auto = [r for r in recs if r["plan"]]
    assert len(auto) == len(recs) // 2 > 0 and all(r["budgets"] is None for r in recs if not r["plan"])
    for r in auto:
        (rec,) = r["budgets"]
        assert rec["rule"] == "tau-frames" and rec["kept"] == r["kept_tokens"]


def test_python_api_takes_auto_plans_per_request():
    images = _images(2)
    with tokensieve.load(shipped.path("tiny-llava"), plan="divprune:keep=auto,tau=0.3") as engine:
        default = engine.generate(QUESTION, images=images[:1], max_new_tokens=1)
        other = engine.generate(QUESTION, images=images[:1], plan="fastv:layer=1,keep=auto,mass=0.5", max_new_tokens=1)
    assert default.stats["budgets"][0]["rule"] == "tau" and other.stats["budgets"][0]["rule"] == "mass"
    assert get_pruner("fastv").scored and not get_pruner("divprune").scored


def test_the_run_command_names_the_image_of_each_vision_stage_budget():
    """``tokensieve run`` prints one budget line per image at a vision-tower stage, each naming its image."""
    from tokensieve.cli import budget_lines

    rec = dict(stage=0, pruner="divprune", rule="tau", value=0.3, reached=0.29, kept=5, entering=16, clipped=None,
               budget=5)
    row = {"plan": "p", "budgets": [dict(rec, image=0), dict(rec, image=1, kept=7)]}
    assert budget_lines(row) == ["budget: p stage 0 image 0 divprune tau=0.3 -> 5 of 16 tokens (reached 0.29)",
                                 "budget: p stage 0 image 1 divprune tau=0.3 -> 7 of 16 tokens (reached 0.29)"]
    assert budget_lines({"plan": "p", "budgets": [rec]})[0].startswith("budget: p stage 0 divprune")

"""``keep=auto`` at a vision-tower stage (issue 44): a budget per image inside the CLIP tower (shipped tiny-llava).

References written here: the tower run by hand, eager attention written out (no transformers forward, no
engine), each image alone with only its own kept tokens (no padding at all). Against them: the budget of every
image (the rule's formula on the hand-run tower's hidden states or CLS attention), the padded batch's tower
output of each image (the projector's input, padding rows sliced off), and a batch of images whose budgets
differ against each image run alone through the engine (kept indices, first-token logits, generated tokens).
"""
import random

import pytest
import torch

import tokensieve
from conftest import model_calls
from test_auto_budget import ref_mass, ref_redundancy
from tokensieve import Plan, PlanError, shipped
from tokensieve.eval.shapeworld import world

QUESTION = "what colour is the circle ?"
TAU_PLAN = "divprune:where=vision,layer=1,keep=auto,tau={tau}"
MASS_PLAN = "cls:where=vision,layer=2,keep=auto,mass={mass}"


@pytest.fixture(scope="module")
def engine():
    with tokensieve.load(shipped.path("tiny-llava")) as e:
        yield e


def _images(n, seed=3):
    rng = random.Random(seed)
    return [world.render(world.random_scene(rng, size=64)) for _ in range(n)]


# ---- the eager reference: CLIP's layers written out ----------------------------------------------------

def _heads(x, n_heads):
    return x.view(*x.shape[:-1], n_heads, -1).transpose(-2, -3)  # [S, D] -> [H, S, d]


def _eager_layer(block, h):
    """One CLIP encoder layer on one image's rows h [S, D], attention written out -> (out [S, D], probs [H, S, S])."""
    attn = block.self_attn
    x = block.layer_norm1(h)
    q, k, v = (_heads(p(x), attn.num_heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)
    out = attn.out_proj((probs @ v).transpose(0, 1).reshape(h.shape))
    h = h + out
    return h + block.mlp(block.layer_norm2(h)), probs


@torch.no_grad()
def _tower_by_hand(engine, pixel_values, layer, keep_idx=None):
    """One image [3, H, W] through the tower by hand; before vision layer ``layer`` only the CLS row and the
    patches ``keep_idx`` go on (None: stop there). -> (hidden entering ``layer`` [1 + P, D], the CLS attention of
    layer - 1 [H, 1 + P], the feature layer's output [k, D] or None)."""
    tower = engine.model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    h = tower.pre_layrnorm(tower.embeddings(pixel_values[None]))[0]
    cls_attn = entering = None
    for i, block in enumerate(tower.encoder.layers[:engine.adapter.feature_layer + 1]):
        if i == layer:
            entering = h
            if keep_idx is None:
                return entering, cls_attn, None
            h = torch.cat([h[:1], h[1:][keep_idx]])
        h, probs = _eager_layer(block, h)
        cls_attn = probs[:, 0]
    return entering, cls_attn, h[1:]


def _pixels(engine, images):
    return engine._device_inputs(engine.prepare(QUESTION, images=images))["pixel_values"]


# ---- plans ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [TAU_PLAN.format(tau=0.2), MASS_PLAN.format(mass=0.5) + ",min=4,max=0.5",
                                  "tome:where=vision,layer=1,keep=auto,tau=0.3;fastv:layer=2,keep=0.5"])
def test_vision_auto_plans_parse_and_round_trip(spec):
    plan = Plan.parse(spec)
    assert Plan.parse(str(plan)) == plan and plan.stages[0].budget is not None and plan.stages[0].where == "vision"


@pytest.mark.parametrize("spec, words", [
    ("flowcut:where=vision,keep=auto,mass=0.5", "cannot give per-image budgets"),
    (TAU_PLAN.format(tau=0.2) + ";visionzip:keep=0.5", "stage 1 .*reads the vision tower's attention"),
    (TAU_PLAN.format(tau=0.2) + ";cls:where=vision,layer=2,keep=0.5", "stage 1 .*reads the vision tower's attention"),
])
def test_vision_auto_plans_that_cannot_run_are_one_clear_error(spec, words):
    with pytest.raises(PlanError, match=words):
        Plan.parse(spec)


def test_a_refused_vision_auto_plan_stops_before_any_model_work(engine):
    with model_calls(engine) as calls:
        with pytest.raises(PlanError, match="reads the vision tower's attention"):
            engine.generate(QUESTION, images=_images(1), plan=TAU_PLAN.format(tau=0.2) + ";visionzip:keep=0.5")
        assert calls == []


# ---- budgets against the rule's formula on the eager reference -----------------------------------------

def _budgets(res):
    return [rec["kept"] for rec in res.stats["budgets"]]


def test_tau_budgets_per_image_are_the_rule_on_the_hand_run_tower(engine):
    images = _images(3)
    plan = TAU_PLAN.format(tau=0.5)
    results = engine.generate_batch([dict(prompt=QUESTION, images=[im], plan=plan, max_new_tokens=1) for im in images])
    for im, pixels, res in zip(images, _pixels(engine, images), results):
        entering, _, _ = _tower_by_hand(engine, pixels, layer=1)
        k, gap, _ = ref_redundancy(entering[1:].float(), 0.5)  # the patches entering the stage (CLS stays)
        (rec,) = res.stats["budgets"]
        assert (rec["stage"], rec["pruner"], rec["image"], rec["rule"], rec["entering"]) == (0, "divprune", 0, "tau", 64)
        assert rec["budget"] == rec["kept"] == k == len(res.kept[0]) and rec["clipped"] is None
        assert rec["reached"] == pytest.approx(gap, abs=1e-4)
    assert len({len(r.kept[0]) for r in results}) > 1  # the budgets differ: the tower batch was padded


def test_mass_budgets_per_image_are_the_rule_on_the_hand_run_cls_attention(engine):
    images = _images(3)
    plan = MASS_PLAN.format(mass=0.5)
    results = engine.generate_batch([dict(prompt=QUESTION, images=[im], plan=plan, max_new_tokens=1) for im in images])
    for pixels, res in zip(_pixels(engine, images), results):
        _, cls_attn, _ = _tower_by_hand(engine, pixels, layer=2)
        k, reached = ref_mass(cls_attn[:, 1:].mean(0), 0.5)  # VTC-CLS's score: the CLS row over patches, head mean
        (rec,) = res.stats["budgets"]
        assert (rec["rule"], rec["budget"], rec["kept"], len(res.kept[0])) == ("mass", k, k, k)
        assert rec["reached"] == pytest.approx(reached, abs=1e-5)
    assert len({len(r.kept[0]) for r in results}) > 1


@pytest.mark.parametrize("bounds, clipped", [(",max=6", "max"), (",min=0.5", "min")])
def test_bounds_hold_per_image(engine, bounds, clipped):
    images = _images(3)
    free = engine.generate_batch([dict(prompt=QUESTION, images=[im], plan=MASS_PLAN.format(mass=0.5),
                                       max_new_tokens=1) for im in images])
    bound = engine.generate_batch([dict(prompt=QUESTION, images=[im], plan=MASS_PLAN.format(mass=0.5) + bounds,
                                        max_new_tokens=1) for im in images])
    for f, b in zip(free, bound):
        (rec,) = b.stats["budgets"]
        want = min(_budgets(f)[0], 6) if clipped == "max" else max(_budgets(f)[0], 32)
        assert rec["budget"] == _budgets(f)[0] and rec["kept"] == want == len(b.kept[0])
        assert rec["clipped"] == (clipped if want != rec["budget"] else None)
    assert any(rec["clipped"] == clipped for r in bound for rec in r.stats["budgets"])


# ---- the padded tower against each image alone --------------------------------------------------------

def _projector_inputs(engine, call):
    """The projector's inputs [n, k_max, D] during ``call`` (a forward pre-hook; the test's own)."""
    seen = []
    handle = engine.model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        out = call()
    finally:
        handle.remove()
    return out, seen


@pytest.mark.parametrize("plan", [TAU_PLAN.format(tau=0.5), MASS_PLAN.format(mass=0.5)])
def test_a_padded_image_tower_output_equals_the_unpadded_one(engine, plan):
    images = _images(3)
    layer = Plan.parse(plan).stages[0].layer
    results, (padded,) = _projector_inputs(engine, lambda: engine.generate_batch(
        [dict(prompt=QUESTION, images=[im], plan=plan, max_new_tokens=1) for im in images]))
    counts = [len(r.kept[0]) for r in results]
    assert padded.shape[:2] == (3, max(counts)) and len(set(counts)) > 1
    for pixels, res, rows in zip(_pixels(engine, images), results, padded):
        _, _, alone = _tower_by_hand(engine, pixels, layer, keep_idx=res.kept[0])  # no padding anywhere
        torch.testing.assert_close(rows[:len(res.kept[0])].float(), alone.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan", [TAU_PLAN.format(tau=0.5), MASS_PLAN.format(mass=0.5) + ";fastv:layer=2,keep=0.5",
                                  "tome:where=vision,layer=1,keep=auto,tau=0.5",
                                  TAU_PLAN.format(tau=0.5) + ";uniform:where=vision,layer=2,keep=0.5"])
def test_a_batch_with_different_budgets_equals_each_image_alone(engine, plan):
    images = _images(3)
    reqs = [dict(prompt=QUESTION, images=[im], plan=plan, max_new_tokens=4) for im in images]
    batch = engine.generate_batch(reqs, batch_size=3, output_logits=True)
    assert len({len(r.kept[0]) for r in batch}) > 1
    for req, res in zip(reqs, batch):
        alone = engine.generate(**req, output_logits=True)
        assert res.stats["budgets"] == alone.stats["budgets"]
        assert all(torch.equal(a, b) for a, b in zip(res.kept, alone.kept))
        assert res.token_ids == alone.token_ids
        torch.testing.assert_close(res.logits[0], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_two_images_of_one_request_get_a_budget_each(engine):
    images = _images(2)
    res = engine.generate(QUESTION, images=images, plan=MASS_PLAN.format(mass=0.5), max_new_tokens=2)
    recs = res.stats["budgets"]
    assert [r["image"] for r in recs] == [0, 1] and recs[0]["kept"] != recs[1]["kept"]
    assert len(res.kept[0]) == recs[0]["kept"] + recs[1]["kept"]
    alone = [engine.generate(QUESTION, images=[im], plan=MASS_PLAN.format(mass=0.5), max_new_tokens=2) for im in images]
    assert [r["kept"] for r in recs] == [a.stats["budgets"][0]["kept"] for a in alone]
    assert res.kept[0].tolist() == alone[0].kept[0].tolist() + [64 + i for i in alone[1].kept[0].tolist()]

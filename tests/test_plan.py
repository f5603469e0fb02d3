"""Plan parsing and validation (no model needed)."""
import json

import pytest

from tokensieve import Plan, PlanError


def test_parse_string_forms():
    p = Plan.parse("uniform:keep=288;fastv:layer=2,keep=64")
    assert [(s.pruner, s.where, s.layer, s.keep) for s in p.stages] == [
        ("uniform", "pre_llm", None, 288), ("fastv", "llm", 2, 64)]
    assert Plan.parse("fastv:layer=2,keep=0.25").stages[0].keep == 0.25
    assert Plan.parse("fastv:keep=8").stages[0].layer == 2  # FastV's default K
    assert Plan.parse("random:keep=5,seed=3").stages[0].options == {"seed": 3}
    assert Plan.parse("uniform:where=vision,layer=1,keep=9").stages[0].where == "vision"
    assert not Plan.parse(None) and not Plan.parse("")


def test_round_trip_and_dict_and_files(tmp_path):
    spec = [{"pruner": "uniform", "keep": 64}, {"pruner": "fastv", "layer": 2, "keep": 0.5}]
    p = Plan.parse(spec)
    assert Plan.parse(str(p)) == p
    (tmp_path / "p.json").write_text(json.dumps(spec))
    (tmp_path / "p.yaml").write_text("stages:\n  - pruner: uniform\n    keep: 64\n  - {pruner: fastv, layer: 2, keep: 0.5}\n")
    assert Plan.parse(str(tmp_path / "p.json")) == p == Plan.parse(str(tmp_path / "p.yaml"))


@pytest.mark.parametrize("spec, words", [
    ("nosuch:keep=3", ["unknown pruner 'nosuch'", "fastv", "uniform"]),
    ("fastv:layer=2,keep=0", ["keep must be > 0", "stage 0"]),
    ("fastv:layer=2,keep=-3", ["keep must be > 0"]),
    ("fastv:layer=2,keep=1.5", ["ratio keep must be in (0, 1]"]),
    ("fastv:layer=2,keep=abc", ["keep must be an int count"]),
    ("fastv:where=pre_llm,keep=3", ["cannot act at 'pre_llm'"]),
    ("uniform:keep=3,bogus=1", ["unknown option(s) ['bogus']"]),
    ("uniform:where=moon,keep=3", ["where must be one of"]),
    ("uniform:layer=2,keep=3", ["takes no layer"]),
    ("uniform:keep", ["not key=value"]),
    ("uniform:keep=4;random:keep=9", None),
])
def test_bad_plans_name_the_problem(spec, words):
    if words is None:
        Plan.parse(spec)  # parses; the budget check happens per request
        with pytest.raises(PlanError, match="stage 1.*larger than the 4 visual tokens entering"):
            Plan.parse(spec).keep_counts(100)
        return
    with pytest.raises(PlanError) as e:
        Plan.parse(spec)
    for w in words:
        assert w in str(e.value)


def test_keep_counts_and_layer_check():
    p = Plan.parse("uniform:where=vision,layer=1,keep=0.5;random:keep=0.5;fastv:layer=2,keep=3")
    assert p.keep_counts(128, n_images=2) == [32, 32, 3]  # vision counts per image
    with pytest.raises(PlanError, match="LLM layer must be in"):
        Plan.parse("fastv:layer=9,keep=3").check(n_llm_layers=4, n_vision_layers=3, supports_vision_stages=True)
    for plan in ("fastv:layer=1,keep=3", "fastv:keep=3"):  # a one-layer LLM: no valid layer, not "[1, 0]"
        with pytest.raises(PlanError, match="LLM has 1 layer, and a stage there acts before a layer after the first"):
            Plan.parse(plan).check(n_llm_layers=1, n_vision_layers=3, supports_vision_stages=True)
    with pytest.raises(PlanError, match="no vision-tower stages"):
        Plan.parse("uniform:where=vision,layer=1,keep=3").check(4, 3, supports_vision_stages=False)
    with pytest.raises(PlanError, match="must come after"):
        Plan.parse("fastv:layer=3,keep=8;fastv:layer=2,keep=4").check(4, 3, True)

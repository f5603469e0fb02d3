"""tokensieve's vLLM plugin, the parts that need no vLLM engine: the plan of a request (``tokensieve.serving.plans``:
refusals, positions, tower plans, the selection against the engine's), that nothing in tokensieve imports vLLM,
and the vLLM environment's torchvision workaround. The runs against vLLM: ``tests/test_vllm_plugin.py``.
"""
import os
import subprocess
import sys

import pytest
import torch

from test_vllm_plugin import BAD, BAD_REASON, PLANS, ROOT, VLLM_PYTHON, vllm_env
from tokensieve.engine.plan import Plan
from tokensieve.eval.shapeworld import report
from tokensieve.serving import plans


# ---- the pure part, without vLLM ----------------------------------------------------------------------------
@pytest.mark.parametrize("value,reason", list(zip(BAD, BAD_REASON)))
def test_bad_plans_are_refused_naming_tokensieve_and_the_reason(value, reason):
    with pytest.raises(plans.PlanRefused) as e:
        plans.kept_count(plans.parse(value), 64)
    assert str(e.value).startswith("tokensieve: ") and reason in str(e.value), str(e.value)


def test_runs_in_vllm_is_every_pre_llm_pruner_that_reads_only_the_tokens():
    assert set(plans.RUNS_IN_VLLM) == {"random", "uniform", "pool", "divprune", "dycoke", "vidcom2"}
    assert set(plans.RUNS_WITH_TOWER) == {"cls", "visionzip", "vispruner", "prumerge", "tome", "flowcut", "rollout",
                                          "fastvid", "holitom"}
    assert set(plans.RUNS_WITH_SURROGATE) == {"cls", "visionzip", "vispruner", "prumerge", "tome", "fastvid"}
    assert plans.parse(None) is None
    assert plans.kept_count(plans.parse("divprune:keep=0.25"), 64) == 16
    assert plans.kept_count(plans.parse("divprune:keep=0.5;random:keep=8"), 64) == 8
    assert plans.decode(plans.encode("pool:keep=0.5")) == "pool:keep=0.5" and plans.decode(plans.encode(None)) is None


@pytest.mark.parametrize("value,tower_last,reason", [
    ("flowcut:where=pre_llm,keep=0.25", None, "needs tower.cls, tower.values of a vision tower with a CLS token"),
    ("rollout:where=pre_llm,keep=0.25", None, "needs tower.qk"),
    ("prumerge:keep=0.25", 22, "reads vision layer 23, past the feature layer 22"),
    ("cls:layers=3/30,keep=0.25", 22, "ensemble layers must be in [0, 22]"),
])
def test_tower_plans_are_refused_where_the_model_cannot_record_them(value, tower_last, reason):
    """A tower pruner without a surrogate on a model that records no tower (Qwen2-VL), a tower layer vLLM does
    not build (PruMerge's, one past LLaVA's feature layer): refused before any work."""
    with pytest.raises(plans.PlanRefused) as e:
        plans.parse(value, tower_last)
    assert reason in str(e.value), str(e.value)
    assert plans.parse(value.replace("layers=3/30,", ""), 22 if tower_last is None else None) is not None


def test_positions_other_than_vllms_are_refused_and_the_default_is_vllms():
    """vLLM numbers a pruned LLaVA prompt 0..L-1 and keeps Qwen2-VL's original M-RoPE positions: a plan asking for
    the other convention is refused for that family; a plan naming none means the same in the engine (the pruners'
    official convention is contiguous, which the M-RoPE adapters run as original)."""
    from tokensieve.engine.adapters import ADAPTERS

    for family, runs in plans.VLLM_POSITIONS.items():
        other = {"original": "contiguous", "contiguous": "original"}[runs]
        with pytest.raises(plans.PlanRefused, match=f"positions={other}, but vLLM numbers a pruned {family}"):
            plans.parse(f"divprune:keep=0.25,positions={other}", family=family)
        assert plans.parse(f"divprune:keep=0.25,positions={runs}", family=family).positions == runs
        assert plans.parse("divprune:keep=0.25", family=family) is not None
        for name in plans.RUNS_IN_VLLM + plans.RUNS_WITH_TOWER:  # the engine's default on that family is what vLLM does
            engine_runs = Plan.parse(f"{name}:keep=0.5").positions
            engine_runs = "original" if ADAPTERS[family].contiguous_refused else engine_runs
            assert engine_runs == runs, (family, name)


@pytest.mark.parametrize("plan", PLANS)
def test_select_keeps_what_the_engine_keeps(shipped_engine, plan):
    """plans.select on the engine's own projected features keeps the engine's kept set (the engine: reference)."""
    engine = shipped_engine("tiny-qwen2-vl")
    q = report.held_out(n_images=1, n_videos=0)[0]
    r = engine.generate(q.question, images=q.images, plan=plan, max_new_tokens=1)
    inputs = engine.processor(images=q.images, text=["<|vision_start|><|image_pad|><|vision_end|>"], return_tensors="pt")
    with torch.no_grad():
        feats = engine.adapter.encode_images(dict(inputs))[0]
    coords = engine.adapter.image_coords(dict(inputs))[0]
    kept, tokens = plans.select(Plan.parse(plan), feats, coords)
    assert kept.tolist() == r.kept[0].tolist()
    assert tokens.shape == (kept.numel(), feats.shape[1])


def test_nothing_in_tokensieve_imports_vllm():
    """Every module of every package in setup.py's PACKAGES, except the plugin's vLLM glue, imported in one
    process with vLLM installed (vLLM's environment when built, else this one): vllm stays unimported."""
    python = VLLM_PYTHON if os.path.isfile(VLLM_PYTHON) else sys.executable
    script = f"""
import ast, importlib, os, sys
tree = ast.parse(open({os.path.join(ROOT, 'setup.py')!r}).read())
packages = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PACKAGES")
names = [pkg if f == "__init__.py" else pkg + "." + f[:-3] for pkg, folder in packages.items()
         for f in sorted(os.listdir(os.path.join({ROOT!r}, folder))) if f.endswith(".py") and f != "__main__.py"]
failed = []
for n in names:
    if not n.startswith("tokensieve.serving.vllm_"):
        try:
            importlib.import_module(n)
        except ModuleNotFoundError as e:  # an optional dependency this environment lacks
            failed.append(e.name)
print(len(names), "vllm" in sys.modules, "vllm" in failed)
"""
    out = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd="/", timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    n, imported, failed = out.stdout.split()[-3:]
    assert int(n) > 100 and imported == "False" and failed == "False", out.stdout + out.stderr[-2000:]


def test_the_torchvision_workaround_is_what_lets_torchvision_import_in_the_vllm_env():
    """In vLLM's environment torchvision's operator library does not load (a CUDA build beside the CPU torch);
    serving/tv_ops.py, run from the .pth line, declares its operators first: torchvision and transformers'
    image code import, and only then (without the .pth line, ``-S`` plus the site directory by hand, it fails)."""
    python = vllm_env()
    check = ("import sys, torch, torchvision, transformers.image_utils; from torchvision import extension; "
             "print('_tokensieve_tv_ops' in sys.modules, extension._has_ops(), hasattr(torch.ops.torchvision, 'nms'))")
    out = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd="/", timeout=300)
    assert out.stdout.split() == ["True", "False", "True"], out.stderr[-2000:]
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, cwd="/").stdout.strip()
    bare = subprocess.run([python, "-S", "-c", f"import sys; sys.path.append({site!r}); import torchvision"],
                          capture_output=True, text=True, cwd="/", timeout=300)
    assert bare.returncode != 0 and "torchvision::nms does not exist" in bare.stderr

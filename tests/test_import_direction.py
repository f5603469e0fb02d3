"""Dependencies point down (issue 42 item 2): the engine and the pruners import nothing from above them.

Every module under ``tokensieve.engine`` and ``tokensieve.pruners`` is parsed with ``ast`` (no import runs);
every ``import`` / ``from ... import`` in it, at module level or inside a function, relative ones resolved
against the module's package, and every ``importlib.import_module("...")`` with a literal name, must not
reach the facade (``tokensieve`` itself and its modules in api/: ``tokensieve.loading``, ``.cli``,
``.testing``, ...), ``tokensieve.eval*`` or ``tokensieve.demos*``.
"""
from __future__ import annotations

import ast
import importlib.util
import os

import pytest

import tokensieve

PACKAGE = "tokensieve"
CHECKED = ("tokensieve.engine", "tokensieve.pruners")
ABOVE = ("tokensieve.eval", "tokensieve.demos")  # and their submodules


def facade_modules() -> set[str]:
    """``tokensieve`` and every module beside its __init__ (the api/ folder): load, loading, cli, testing, ..."""
    folder = os.path.dirname(tokensieve.__file__)
    names = {PACKAGE}
    for entry in os.listdir(folder):
        if entry.endswith(".py") and entry != "__init__.py":
            names.add(f"{PACKAGE}.{entry[:-3]}")
    return names


def upward(module: str, facade: set[str]) -> bool:
    return module in facade or any(module == a or module.startswith(a + ".") for a in ABOVE)


def modules_under(package: str) -> list[tuple[str, str]]:
    """(dotted module name, file path) of every .py file of ``package``, subpackages included."""
    root = importlib.util.find_spec(package).submodule_search_locations[0]
    out = []
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
        for f in sorted(files):
            if f.endswith(".py"):
                name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                out.append((name, os.path.join(folder, f)))
    return sorted(out)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def imported(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``source`` (module ``module``), functions included.
    ``from P import n``: ``P.n`` where that is a module, else ``P`` (a name taken from P)."""
    here = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((node.lineno, sub if a.name != "*" and _is_module(sub) else target))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            name = node.args[0].value
            if name.startswith("."):  # import_module(".x", package) relative to the module's package
                name = here + name
            found.append((node.lineno, name))
    return found


def upward_imports(package: str) -> list[str]:
    facade = facade_modules()
    bad = []
    for name, path in modules_under(package):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for line, target in imported(name, source, is_package=path.endswith("__init__.py")):
            if upward(target, facade):
                bad.append(f"{os.path.relpath(path)}:{line} imports {target}")
    return bad


@pytest.mark.parametrize("package", CHECKED)
def test_no_upward_imports(package):
    assert upward_imports(package) == []


@pytest.mark.parametrize("source,target", [
    ("def f():\n    from .. import load\n", "tokensieve"),  # the facade's load, inside a function
    ("from ..eval.shapeworld import shipped\n", "tokensieve.eval.shapeworld.shipped"),
    ("import tokensieve.demos.app\n", "tokensieve.demos.app"),
    ("from ...testing import make_tiny\n", "tokensieve.testing"),
    ("import importlib\nimportlib.import_module('tokensieve.cli')\n", "tokensieve.cli"),
])
def test_the_walker_sees_an_upward_import(source, target):
    """The check itself can fail: each of these, written in an engine module, is found and refused."""
    module = "tokensieve.engine.adapters.x" if source.startswith("from ...") else "tokensieve.engine.x"
    found = [t for _, t in imported(module, source)]
    assert target in found and upward(target, facade_modules())


def test_the_walker_allows_imports_downward():
    source = "from ..pruners import get_pruner\nfrom . import attention\nfrom ..kernels import attention_row\n"
    found = [t for _, t in imported("tokensieve.engine.x", source)]
    assert found == ["tokensieve.pruners", "tokensieve.engine.attention", "tokensieve.kernels"]
    assert not any(upward(t, facade_modules()) for t in found)


# ---- the frames stages' models come from above: an engine built by hand ---------------------------------
QUESTION, PROMPT = "what appeared first", "is there a red circle ?"  # words the tiny tokenizers know


def _by_hand(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return (AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa"),
            AutoProcessor.from_pretrained(path))


def test_an_engine_built_by_hand_scores_with_itself_and_names_what_to_pass(tiny_path):
    """Engine(model, processor) has no way to load another model: a stage needing one is refused before any
    work, naming what to pass; quota rating with the engine's own model runs; given FrameModels, keyscore runs."""
    from conftest import noise_image

    model, processor = _by_hand(tiny_path("llava"))
    frames = [noise_image(20 + i) for i in range(4)]
    with pytest.raises(tokensieve.InputError, match=r"keyscore: clip=tiny-clip .*tokensieve\.load\(\.\.\.\) or pass "
                                                     r"Engine\(\.\.\., frame_models=tokensieve\.FrameModels\(\)\)"):
        tokensieve.Engine(model, processor, plan="keyscore:keep=0.5")
    rater = tiny_path("qwen2_vl")
    with pytest.raises(tokensieve.InputError, match=f"quota: scorer={rater} .*frame_models=tokensieve.FrameModels"):
        tokensieve.Engine(model, processor, plan=f"quota:keep=0.5,scorer={rater}")
    plan = f"quota:keep=0.5,prompt={PROMPT},yes=yes,no=no,within=uniform"
    with tokensieve.Engine(model, processor, plan=plan) as engine:
        res = engine.generate(QUESTION, video=frames, max_new_tokens=1)
        assert res.stats["scoring_flops"] > 0 and len(res.kept[0]) == 128
    pytest.importorskip("open_clip")
    with tokensieve.Engine(model, processor, plan="keyscore:keep=0.5", frame_models=tokensieve.FrameModels()) as engine:
        assert engine.generate(QUESTION, video=frames, max_new_tokens=1).stats["scoring_flops"] > 0

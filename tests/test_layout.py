"""Packaging: one package, never top-level modules named engine / pruners / kernels / eval."""
import importlib.util
from pathlib import Path

import tokensieve.engine


def test_subpackages_import_under_tokensieve():
    for name in ["engine", "pruners", "kernels", "demos", "eval", "testing", "cli"]:
        assert importlib.util.find_spec(f"tokensieve.{name}") is not None, name


def test_no_generic_top_level_modules_from_this_repo():
    repo = Path(tokensieve.engine.__file__).resolve().parents[1]
    for name in ["engine", "pruners", "kernels", "demos", "eval", "api"]:
        spec = importlib.util.find_spec(name)
        where = [spec.origin] + list(spec.submodule_search_locations or []) if spec else []
        assert not any(w and Path(w).resolve().is_relative_to(repo) for w in where), f"top-level '{name}' is this repo's"

"""tokensieve: training-free visual-token pruning for vision-language models.

    import tokensieve
    engine = tokensieve.load("llava-hf/llava-1.5-7b-hf", plan="fastv:layer=2,keep=0.25")
    result = engine.generate("What is in the image?", images=["photo.jpg"])
    print(result.text, result.stats["kept_tokens"])
"""
from __future__ import annotations

import os as _os
import sys as _sys


def _drop_repo_root_from_path() -> None:
    """``python -m tokensieve...`` run from this repository's root puts the root first on ``sys.path``,
    and there the folder ``kernels/`` shadows the Hugging Face ``kernels`` package that transformers
    (5.25 depends on it) imports: every model load fails. tokensieve is importable without the root (it
    is installed; the editable finder maps ``tokensieve.*`` to the folders), so drop the root from the path.
    Only a source checkout matches (``api/`` and ``kernels/`` beside each other); an installed package
    never does.

    Why a ``sys.path`` edit and nothing cleaner: ``python -m`` puts the current directory first on the path
    (only ``python -P`` / ``PYTHONSAFEPATH`` stop it, and that is the user's choice); the path finder that
    then finds ``kernels/`` runs before any finder a package installs; and the layout keeps the top-level
    ``kernels/`` folder (the design card). A console script (``tokensieve ...``) and ``pytest`` never need it."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if "kernels" in _sys.modules or not (_os.path.isfile(_os.path.join(root, "api", "__init__.py"))
                                         and _os.path.isfile(_os.path.join(root, "kernels", "__init__.py"))):
        return
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != root]


_drop_repo_root_from_path()

from .engine import (Engine, InputError, Plan, PlanError, Request, Result, Stage, TokenSieveError,
                     UnsupportedModelError)
from .loading import FrameModels

__version__ = "0.1.0"


def default_model() -> str:
    """Path of the embedded default model: ``tiny-llava``, the LLaVA-1.5 trained on the shape world that ships
    inside the package as data (``tokensieve.shipped``, docs/training.md). Nothing is downloaded."""
    from . import shipped

    if not shipped.available(shipped.DEFAULT):
        raise FileNotFoundError(f"the embedded default model is missing from the package "
                                f"({shipped.path(shipped.DEFAULT)}): reinstall tokensieve, or pass a model")
    return shipped.path(shipped.DEFAULT)


def load(model: str | None = None, plan=None, device: str = "cpu", dtype=None, max_new_tokens: int = 32,
         video_mode: str = "native") -> Engine:
    """Load a supported VLM (hub id or local directory) with its processor and wrap it in an Engine.

    model: None loads the embedded default model. plan: the default plan for every call
    (string, list of dicts, YAML/JSON path or Plan). dtype: a torch dtype or its name.
    video_mode: "native" (a family's own video input where it has one: Qwen2-VL, Qwen2.5-VL,
    LLaVA-OneVision) or "frames" (every family: the frames as a sequence of images).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .engine.adapters import model_types
    from .engine.request import VIDEO_MODES
    from .loading import check_device, check_dtype, check_files, check_model, check_model_type

    plan = Plan.parse(plan)  # bad arguments fail before any loading
    dtype, device = check_dtype(dtype), check_device(device)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if video_mode not in VIDEO_MODES:
        raise InputError(f"video_mode must be one of {VIDEO_MODES}, got {video_mode!r}")
    model = default_model() if model is None else check_model(model)
    check_model_type(model, model_types())
    check_files(model)
    hf = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype or "auto", attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(model)
    return Engine(hf.to(device), processor, plan=plan, max_new_tokens=max_new_tokens, video_mode=video_mode,
                  frame_models=FrameModels())


_SUBMODULES = ("testing", "eval", "demos", "pruners", "kernels", "shipped")  # imported on first use


def __getattr__(name: str):
    """``tokensieve.testing.make_tiny(...)`` after a plain ``import tokensieve``: public subpackages load
    on first access (PEP 562), so importing the package stays cheap."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tokensieve' has no attribute {name!r}")


__all__ = ["load", "Engine", "Result", "Plan", "Stage", "Request", "TokenSieveError", "PlanError", "InputError",
           "UnsupportedModelError", "default_model", "FrameModels"]

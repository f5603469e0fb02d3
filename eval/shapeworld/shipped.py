"""The world's shipped models by the family keys the report and heldout use (``llava``, ``qwen2_vl``, ``clip``);
the checkpoints are package data of the facade (``tokensieve.shipped``).

    from tokensieve.eval.shapeworld import shipped
    shipped.path("llava")        # = tokensieve.shipped.path("tiny-llava")
    shipped.path("clip")         # an open_clip local-dir: open_clip.create_model_and_transforms("local-dir:" + ...)
"""
from __future__ import annotations

from ... import shipped as package

MODELS = {"llava": "tiny-llava", "qwen2_vl": "tiny-qwen2-vl"}  # VLMs, in the pruning report
CLIP = package.CLIP
NAMES = package.NAMES


def path(name: str) -> str:
    """Directory of a shipped model: a key of MODELS, "clip", or a shipped name (tokensieve.shipped.NAMES)."""
    folder = CLIP if name == "clip" else MODELS.get(name, name)
    if folder not in NAMES:
        raise KeyError(f"no shipped model '{name}'; shipped: {', '.join([*MODELS, 'clip', *NAMES])}")
    return package.path(folder)


def resolve(name: str) -> str:
    """A model argument: a key of MODELS -> its directory; else as ``tokensieve.shipped.resolve`` (a shipped
    name -> its directory, anything else as given)."""
    return path(name) if name in MODELS else package.resolve(name)


def available(name: str) -> bool:
    return package.available(CLIP if name == "clip" else MODELS.get(name, name))

"""The tiny models that ship with the package, trained on the shape world (docs/training.md).

    from tokensieve.eval.shapeworld import shipped
    shipped.path("llava")        # a transformers checkpoint directory: tokensieve.load(...) / from_pretrained
    shipped.path("tiny-llava")   # the same: a shipped model by its published name
    shipped.path("clip")         # an open_clip local-dir: open_clip.create_model_and_transforms("local-dir:" + ...)

Every command that takes a model (``tokensieve run / eval / demo --model``, ``tokensieve.load``, the report,
heldout, diagnose, keyscore's ``clip=``, quota's ``scorer=``) takes the published names ``tiny-llava``,
``tiny-qwen2-vl`` and ``tiny-clip``; a local directory of the same name wins over the shipped model.
"""
from __future__ import annotations

import os

MODELS = {"llava": "tiny-llava", "qwen2_vl": "tiny-qwen2-vl"}  # VLMs, in the pruning report
CLIP = "tiny-clip"
NAMES = (*MODELS.values(), CLIP)  # the published names
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def path(name: str) -> str:
    """Directory of a shipped model: a key of MODELS, "clip", or a published name (NAMES)."""
    folder = CLIP if name == "clip" else MODELS.get(name, name if name in NAMES else None)
    if folder is None:
        raise KeyError(f"no shipped model '{name}'; shipped: {', '.join([*MODELS, 'clip', *NAMES])}")
    return os.path.join(ROOT, folder)


def resolve(name: str) -> str:
    """A model argument as given, or the shipped model's directory when it is a published name (NAMES) and
    no local directory of that name exists."""
    if isinstance(name, str) and name in NAMES and not os.path.isdir(name):
        return path(name)
    return name


def available(name: str) -> bool:
    return os.path.isdir(path(name)) and bool(os.listdir(path(name)))

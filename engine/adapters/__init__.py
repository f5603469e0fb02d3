"""Adapter registry, keyed by ``config.model_type``: one module per family, one entry here.

A family's module holds its adapter class (what the engine needs) and, below it, what the tests, the shape
world and the speed bench need to build models of the family, read through ``family_module``:

- ``PLACEHOLDERS``: {config field: the word-level test tokenizer's placeholder token} (image / video tokens);
- ``CHAT_TEMPLATE``: the test tokenizer's chat template in the family's turn format;
- ``processor(config, tok, **image)``: a processor of ``config``'s geometry for the test tokenizer ``tok``;
- ``tiny_model(tok)``: (tiny random model, processor), what ``tokensieve.testing.make_tiny`` writes;
- ``BENCH``: the speed bench's model of the family, ``{"model": name, "image": (width, height)}`` or
  ``{"model": name, "video": (frames, height, width)}``, its configuration the file ``<name>.json`` of
  ``eval/bench/configs/``; or None.

These import transformers inside the functions only; nothing here imports the testing helpers or eval/.
"""
import importlib
from types import ModuleType

from ..errors import UnsupportedModelError
from .base import Adapter
from .gemma3 import Gemma3Adapter
from .glm4v import Glm4vAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .llava_onevision1_5 import LlavaOnevision15Adapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .smolvlm import SmolVLMAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2_5_VLAdapter,
    "qwen3_vl": Qwen3VLAdapter,  # qwen3_vl_moe too (its model_types)
    "gemma3": Gemma3Adapter,
    "internvl": InternVLAdapter,
    "smolvlm": SmolVLMAdapter,
    "glm4v": Glm4vAdapter,
    "llava_onevision1_5": LlavaOnevision15Adapter,
}
FAMILY_MEMBERS = ("PLACEHOLDERS", "CHAT_TEMPLATE", "processor", "tiny_model", "BENCH")  # what a family module holds


def adapter_for(model, processor) -> Adapter:
    """The adapter of ``model``'s family: the registry entry of its model type, or the one listing it among
    its ``model_types`` (e.g. ``qwen3_vl_moe`` runs through Qwen3-VL's)."""
    model_type = model.config.model_type
    family = model_types().get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; supported families: {', '.join(sorted(ADAPTERS))}")
    return family(model, processor)


def model_types() -> dict[str, type[Adapter]]:
    """Every model type the registry runs (each family's ``model_types`` and its key) -> its adapter."""
    out = {t: a for a in ADAPTERS.values() for t in a.model_types}
    return {**out, **ADAPTERS}


def family_module(family: str) -> ModuleType:
    """The module that defines ``family``'s registered adapter (its ``FAMILY_MEMBERS`` with it)."""
    if family not in ADAPTERS:
        raise ValueError(f"unknown family '{family}'; choose from {', '.join(ADAPTERS)}")
    return importlib.import_module(ADAPTERS[family].__module__)

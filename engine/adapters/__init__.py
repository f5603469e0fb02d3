"""Adapter registry, keyed by ``config.model_type``: one file per family, one entry here."""
from ..errors import UnsupportedModelError
from .base import Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2_5_VLAdapter,
}


def adapter_for(model, processor) -> Adapter:
    model_type = model.config.model_type
    try:
        return ADAPTERS[model_type](model, processor)
    except KeyError:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; supported families: {', '.join(sorted(ADAPTERS))}") from None

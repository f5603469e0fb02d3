"""Adapter registry, keyed by ``config.model_type``: one file per family, one entry here."""
from ..errors import UnsupportedModelError
from .base import Adapter
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    cls.model_types[0]: cls for cls in (LlavaAdapter, Qwen2VLAdapter)
}


def adapter_for(model, processor) -> Adapter:
    model_type = model.config.model_type
    try:
        return ADAPTERS[model_type](model, processor)
    except KeyError:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; supported families: {', '.join(sorted(ADAPTERS))}") from None

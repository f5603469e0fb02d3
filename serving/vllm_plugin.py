"""The plugin vLLM loads by itself (entry point group ``vllm.general_plugins``, in every vLLM process).

``register()`` points vLLM's model registry at tokensieve's subclasses of vLLM's own model classes (by
"module:Class" strings: nothing heavy is imported until vLLM builds the model). Requests without a plan run
exactly vLLM's code.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("tokensieve.serving")

MODELS = {  # architecture -> tokensieve's subclass of vLLM's class for it
    "LlavaForConditionalGeneration": "tokensieve.serving.vllm_llava:TokenSieveLlava",
}


def register() -> None:
    """Register the model classes (idempotent: vLLM may call it several times per process)."""
    from vllm import ModelRegistry

    for arch, cls in MODELS.items():
        ModelRegistry.register_model(arch, cls)
    logger.info("tokensieve: vLLM plugin registered for %s (per-request mm_processor_kwargs={'plan': ...})",
                ", ".join(MODELS))

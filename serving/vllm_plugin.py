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
    "Qwen2VLForConditionalGeneration": "tokensieve.serving.vllm_qwen2_vl:TokenSieveQwen2VL",
}


def register() -> None:
    """Register the model classes (idempotent: vLLM may call it several times per process)."""
    from vllm import ModelRegistry

    for arch, cls in MODELS.items():
        ModelRegistry.register_model(arch, cls)
    enable_mrope_recompute()
    logger.info("tokensieve: vLLM plugin registered for %s (per-request mm_processor_kwargs={'plan': ...})",
                ", ".join(MODELS))


def enable_mrope_recompute() -> None:
    """The one patch of vLLM internals (a workaround): let the model runner recompute the M-RoPE positions of
    pruned items for tokensieve's models.

    vLLM's runner calls a model's ``recompute_mrope_positions`` only when ``is_multimodal_pruning_enabled``,
    which its GPU runner sets from the engine-wide ``video_pruning_rate > 0`` (EVS) and its CPU runner never
    sets (a bug: EVS then crashes on CPU). A plan is per request, so the flag must be on whenever the model is
    one of tokensieve's M-RoPE models (``tokensieve_recomputes_mrope``): each runner's ``load_model`` is wrapped
    to set it after loading. Positions of unpruned items come out the same (the recompute of a full item is the
    identity). Idempotent."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for runner in (CPUModelRunner, GPUModelRunner):
        load = runner.__dict__["load_model"]
        if getattr(load, "tokensieve_wrapped", False):
            continue

        def load_model(self, *args, _load=load, **kwargs):
            _load(self, *args, **kwargs)
            if getattr(self.get_model(), "tokensieve_recomputes_mrope", False) and self.uses_mrope:
                self.is_multimodal_pruning_enabled = True

        load_model.tokensieve_wrapped = True
        setattr(runner, "load_model", load_model)

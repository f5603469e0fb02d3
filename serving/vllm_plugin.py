"""The plugin vLLM loads by itself (entry point group ``vllm.general_plugins``, in every vLLM process).

``register()`` points vLLM's model registry at tokensieve's subclasses of vLLM's own model classes (by
"module:Class" strings: nothing heavy is imported until vLLM builds the model). Requests without a plan get
what stock vLLM computes: on LLaVA its code path exactly; on the Qwen families (``vllm_qwen``) every item also
carries its M-RoPE positions through vLLM's recompute, which gives an unpruned item its usual positions.
"""
from __future__ import annotations


MODELS = {  # architecture -> tokensieve's subclass of vLLM's class for it
    "LlavaForConditionalGeneration": "tokensieve.serving.vllm_llava:TokenSieveLlava",
    "LlavaNextForConditionalGeneration": "tokensieve.serving.vllm_llava_next:TokenSieveLlavaNext",
    "LlavaOnevisionForConditionalGeneration": "tokensieve.serving.vllm_llava_onevision:TokenSieveLlavaOnevision",
    "Qwen2VLForConditionalGeneration": "tokensieve.serving.vllm_qwen2_vl:TokenSieveQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "tokensieve.serving.vllm_qwen2_5_vl:TokenSieveQwen2_5_VL",
    "Qwen3VLForConditionalGeneration": "tokensieve.serving.vllm_qwen3_vl:TokenSieveQwen3VL",
}


def register() -> None:
    """Register the model classes (idempotent: vLLM may call it several times per process)."""
    from vllm import ModelRegistry

    for arch, cls in MODELS.items():  # vLLM may load plugins before its logging is set up: the models log
        ModelRegistry.register_model(arch, cls)  # (vllm_common.announce) when vLLM builds one


def enable_mrope_recompute() -> None:
    """The one patch of vLLM internals (a workaround): let the model runner recompute the M-RoPE positions of
    pruned items for tokensieve's models. Called by those models' ``__init__`` (inside the runner's
    ``load_model``: the runner modules are loaded then; importing them from ``register`` is too early, before
    vLLM picks its CPU kernels).

    vLLM's runner calls a model's ``recompute_mrope_positions`` only when its ``is_multimodal_pruning_enabled``
    is set, which the GPU runner derives from the engine-wide ``video_pruning_rate > 0`` (EVS) and the CPU
    runner never sets (a bug: EVS then crashes on CPU). A plan is per request, so the flag must be on whenever
    the runner's model is one of tokensieve's M-RoPE models (``tokensieve_recomputes_mrope``): the attribute
    becomes a property of the runner class that reads the stock value or that. Positions of unpruned items
    come out the same (the recompute of a full item is the identity). Idempotent."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if isinstance(GPUModelRunner.__dict__.get(FLAG), property):
        return

    def get(runner) -> bool:
        ours = getattr(runner.__dict__.get("model"), "tokensieve_recomputes_mrope", False) and runner.uses_mrope
        return bool(runner.__dict__.get(FLAG, False) or ours)

    def put(runner, value) -> None:
        runner.__dict__[FLAG] = value

    setattr(GPUModelRunner, FLAG, property(get, put))  # the CPU runner subclasses it


FLAG = "is_multimodal_pruning_enabled"

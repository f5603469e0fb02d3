"""tokensieve in vLLM: a plugin that runs tokensieve's pre-LLM pruners inside vLLM, with a plan per request.

Installed with ``pip install tokensieve[vllm]`` (the entry point ``vllm.general_plugins`` -> ``vllm_plugin.register``);
docs/serving.md. Nothing in tokensieve imports this package, and importing it imports no vLLM: ``plans`` is pure,
the vLLM glue (``vllm_plugin``, ``vllm_common``, ``vllm_llava``, ``vllm_qwen`` and its families ``vllm_qwen2_vl``,
``vllm_qwen2_5_vl``, ``vllm_qwen3_vl``) is imported by vLLM itself.
"""

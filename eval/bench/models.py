"""Models for the benchmark: the real configurations of public VLMs (``eval/bench/configs/*.json``) with random
weights, built in memory (speed does not depend on the weights), depth optionally cut for a CPU, with a
processor of the checkpoint's geometry and the word-level test tokenizer (nothing is downloaded).

    engine, request = bench_engine("llava-1.5-7b", layers=4, vision_layers=4, device="cpu")

``request`` is the benchmark's input for that model: one 336 px image (LLaVA-1.5: 576 visual tokens), one
672 x 336 image (LLaVA-NeXT: base tile + 2 tiles), one 672 px image (Qwen2.5-VL: 576 tokens after the 2 x 2
merger), a 896 x 448 image (InternVL3.5: 2 tiles + thumbnail, 256 tokens each), a 768 x 576 image (SmolVLM2:
2 x 2 crops + global, 81 tokens each), or a 32-frame video (LLaVA-OneVision: 196 tokens a frame); the others in
their adapter's ``BENCH``.

What the bench knows of a family is read from its adapter module (``tokensieve.engine.adapters``): ``BENCH``
(the model's name, its configuration ``configs/<name>.json``, its input), ``PLACEHOLDERS`` and
``processor``. ``MODELS``: the registered families' bench models, in the registry's order.
"""
from __future__ import annotations

import json
import os

import torch

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
PROMPT = "describe the image"


def bench_families() -> dict[str, str]:
    """{bench model name: family} for every registered family whose adapter module names one (``BENCH``)."""
    from ...engine.adapters import ADAPTERS, family_module

    benches = {family: family_module(family).BENCH for family in ADAPTERS}
    return {bench["model"]: family for family, bench in benches.items() if bench}


def __getattr__(name: str):
    """``MODELS``: the bench models' names (``bench_families``), read from the registry at each access."""
    if name == "MODELS":
        return tuple(bench_families())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _config(name: str, tok, layers: int | None, vision_layers: int | None):
    from transformers import CONFIG_MAPPING, AutoConfig

    from ...engine.adapters import family_module

    raw = json.load(open(os.path.join(CONFIGS, f"{name}.json")))
    aliases = CONFIG_MAPPING[raw["model_type"]].attribute_map  # e.g. image_token_id -> the file's image_token_index
    for field, token in family_module(raw["model_type"]).PLACEHOLDERS.items():  # the test tokenizer's ids stand in
        keys = [k for k in dict.fromkeys((field, aliases.get(field, field))) if k in raw]  # the file's name(s) of it
        for key in keys or [aliases.get(field, field)]:
            raw[key] = tok.convert_tokens_to_ids(token)
    text, vision = raw["text_config"], raw["vision_config"]
    text.update(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if layers:
        text["num_hidden_layers"] = min(layers, text["num_hidden_layers"])
    if vision_layers:
        key = "depth" if "depth" in vision else "num_hidden_layers"
        full, vision[key] = vision[key], min(vision_layers, vision[key])
        if "deepstack_visual_indexes" in vision:  # Qwen3-VL: the same layers scaled to the depth kept, so the LLM
            # still receives every DeepStack feature (each index below the depth, distinct while the depth allows)
            scaled = [min(vision[key] - 1, i * vision[key] // full) for i in vision["deepstack_visual_indexes"]]
            vision["deepstack_visual_indexes"] = list(dict.fromkeys(scaled))
        if "fullatt_block_indexes" in vision:  # keep a full-attention block among the layers kept
            vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision[key]] or [vision[key] - 1]
    return AutoConfig.for_model(**raw)


def _request(name: str) -> dict:
    """The bench input of ``name`` (its family's ``BENCH``): random pixels, one image or a video."""
    import numpy as np
    from PIL import Image

    from ...engine.adapters import family_module

    bench = family_module(bench_families()[name]).BENCH
    rng = np.random.default_rng(0)
    if "image" in bench:
        width, height = bench["image"]
        return {"prompt": PROMPT, "images": [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))]}
    frames, height, width = bench["video"]
    return {"prompt": "describe the video", "video": rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)}


def _tiny(device: str, dtype: str | None):
    import tempfile

    import numpy as np
    from PIL import Image

    import tokensieve
    from ...testing import make_tiny

    path = make_tiny("llava", tempfile.mkdtemp(prefix="tokensieve-bench-"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return tokensieve.load(path, device=device, dtype=dtype), {"prompt": "what is the colour", "images": [image]}


def bench_engine(name: str, layers: int | None = None, vision_layers: int | None = None, device: str = "cpu",
                 dtype: str | None = None, seed: int = 0):
    """(Engine over a random model of ``name``'s configuration, the benchmark request for it)."""
    import tokensieve
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    from ...engine.adapters import family_module
    from ...testing import tokenizer_for

    if name == "tiny":  # the test configuration: a tiny random LLaVA (tokensieve.testing), for CI
        return _tiny(device, dtype)
    families = bench_families()
    if name not in families:
        raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(families)}, tiny")
    tok = tokenizer_for(families[name])
    cfg = _config(name, tok, layers, vision_layers)
    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    with no_init_weights(), torch.device(device):  # built where it runs; random values below, much faster than init
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch_dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    model.generation_config.eos_token_id = 3
    model.generation_config.pad_token_id = 0
    engine = tokensieve.Engine(model, family_module(families[name]).processor(cfg, tok),
                               frame_models=tokensieve.FrameModels())  # keyscore's CLIP, quota's rater
    return engine, _request(name)

"""Models for the benchmark: the real configurations of four 7B VLMs (``eval/bench_configs/*.json``) with random
weights, built in memory (speed does not depend on the weights), depth optionally cut for a CPU, with a
processor of the checkpoint's geometry and the word-level test tokenizer (nothing is downloaded).

    engine, request = bench_engine("llava-1.5-7b", layers=4, vision_layers=4, device="cpu")

``request`` is the benchmark's input for that model: one 336 px image (LLaVA-1.5: 576 visual tokens), one
672 x 336 image (LLaVA-NeXT: base tile + 2 tiles), one 672 px image (Qwen2.5-VL: 576 tokens after the 2 x 2
merger), or a 32-frame video (LLaVA-OneVision: 196 tokens a frame).
"""
from __future__ import annotations

import json
import os

import torch

CONFIGS = os.path.join(os.path.dirname(__file__), "bench_configs")
MODELS = ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b", "llava-onevision-7b")
PROMPT = "describe the image"


def _config(name: str, tok, layers: int | None, vision_layers: int | None):
    from transformers import AutoConfig

    raw = json.load(open(os.path.join(CONFIGS, f"{name}.json")))
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", "<video>", "<|image_pad|>", "<|video_pad|>",
                                                       "<|vision_start|>", "<|vision_end|>")}
    if raw["model_type"] == "qwen2_5_vl":  # the test tokenizer's ids stand in for the checkpoint's
        raw.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    else:
        raw.update(image_token_index=ids["<image>"], video_token_index=ids["<video>"])
    text, vision = raw["text_config"], raw["vision_config"]
    text.update(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if layers:
        text["num_hidden_layers"] = min(layers, text["num_hidden_layers"])
    if vision_layers:
        key = "depth" if "depth" in vision else "num_hidden_layers"
        vision[key] = min(vision_layers, vision[key])
        if "fullatt_block_indexes" in vision:  # keep a full-attention block among the layers kept
            vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision[key]] or [vision[key] - 1]
    return AutoConfig.for_model(**raw)


def _processor(name: str, cfg, tok):
    from ..testing import CHAT_TEMPLATES

    kind = cfg.model_type
    if kind == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        ip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
                              vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATES["llava"])
    if kind == "llava_next":
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                        image_grid_pinpoints=cfg.image_grid_pinpoints)
        return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
                                  vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATES["llava"])
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
        geometry = dict(patch_size=14, merge_size=2, temporal_patch_size=2,
                        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**geometry), tokenizer=tok,
                                   video_processor=Qwen2VLVideoProcessor(**geometry), chat_template=CHAT_TEMPLATES["qwen"])
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
    ip = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=cfg.image_grid_pinpoints)
    return LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(
        size={"height": 384, "width": 384}), vision_feature_select_strategy="full", num_image_tokens=729,
        chat_template=CHAT_TEMPLATES["onevision"])


def _request(name: str) -> dict:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    size = {"llava-1.5-7b": (336, 336), "llava-next-7b": (672, 336), "qwen2.5-vl-7b": (672, 672)}.get(name)
    if size is not None:
        return {"prompt": PROMPT, "images": [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))]}
    frames = rng.integers(0, 256, (32, 384, 384, 3), dtype=np.uint8)
    return {"prompt": "describe the video", "video": frames}


def _tiny(device: str, dtype: str | None):
    import tempfile

    import numpy as np
    from PIL import Image

    import tokensieve
    from ..testing import make_tiny

    path = make_tiny("llava", tempfile.mkdtemp(prefix="tokensieve-bench-"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return tokensieve.load(path, device=device, dtype=dtype), {"prompt": "what is the colour", "images": [image]}


def bench_engine(name: str, layers: int | None = None, vision_layers: int | None = None, device: str = "cpu",
                 dtype: str | None = None, seed: int = 0):
    """(Engine over a random model of ``name``'s configuration, the benchmark request for it)."""
    import tokensieve
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    from ..testing import make_tokenizer

    if name == "tiny":  # the test configuration: a tiny random LLaVA (tokensieve.testing), for CI
        return _tiny(device, dtype)
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(MODELS)}, tiny")
    tok = make_tokenizer()
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
    engine = tokensieve.Engine(model, _processor(name, cfg, tok))
    return engine, _request(name)

"""The two tiny VLM architectures trained on the shape world (issue 5): one builder per family.

Both see a 96 x 96 image as 64 visual tokens in an 8 x 8 raster (row-major), so the world's
``cell_labels(scene, GRID)`` name what each visual token shows.

- ``llava``: LLaVA-1.5 (CLIP tower, width 128 x 4 layers, patch 12, CLS token, features from the
  second-to-last layer; 2-layer MLP projector; Llama LM, width 192 x 4 layers).
- ``qwen2_vl``: Qwen2-VL (no CLS, patch 6 -> 16 x 16 patches merged 2 x 2 -> 64 tokens, 3-D rotary
  positions; Qwen2 LM, width 192 x 4 layers).

``visual_tokens(model)`` names the module whose output is the LLM's visual tokens, for the
training script's per-token auxiliary loss. Each family's processor (geometry read from the model's
configuration) and chat template come from its adapter module (``tokensieve.engine.adapters``).
"""
from __future__ import annotations

import torch

from ...engine.adapters import llava, qwen2_vl

IMAGE = 96
GRID = 8  # visual tokens per side
VIDEO_FRAMES = 8  # a video is 8 frames, one image placeholder each (the engine's format)
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
LM = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
          max_position_embeddings=2048)


def build_llava(tok):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                              image_size=IMAGE, patch_size=IMAGE // GRID)
    text = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, **LM)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg), llava.processor(cfg, tok, image_mean=MEAN, image_std=STD)


def mrope_parameters(width_rope_scale: float = 1.0) -> dict:
    """The Qwen2 LM's M-RoPE: 8 rotary pairs each for time, height and width (head_dim 48, theta 10^4).

    M-RoPE gives width the lowest frequencies (10^4^(-16/24) ... : 0.0022 to 0.00015 rad per
    position), so 8 columns differ by at most 0.015 rad and no attention can tell left from right.
    ``width_rope_scale`` multiplies the width pairs' frequencies (21.5 gives them the height pairs'
    frequencies) through transformers' standard ``longrope`` per-pair factors, leaving time and height
    exactly as they were and the attention unscaled (factor 1)."""
    head_half = LM["hidden_size"] // LM["num_attention_heads"] // 2
    section = [head_half // 3, head_half // 3, head_half - 2 * (head_half // 3)]
    if width_rope_scale <= 0:
        raise ValueError(f"width_rope_scale must be > 0, got {width_rope_scale}")
    if width_rope_scale == 1.0:
        return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    factors = [1.0] * (section[0] + section[1]) + [1.0 / width_rope_scale] * section[2]
    return {"rope_type": "longrope", "rope_theta": 10000.0, "mrope_section": section, "short_factor": factors,
            "long_factor": factors, "factor": 1.0, "original_max_position_embeddings": LM["max_position_embeddings"]}


def build_qwen2_vl(tok, width_rope_scale: float = 1.0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    patch, merge = IMAGE // GRID // 2, 2
    text = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                rope_parameters=mrope_parameters(width_rope_scale),
                **LM)
    vision = dict(depth=4, embed_dim=128, hidden_size=LM["hidden_size"], num_heads=4, mlp_ratio=2, patch_size=patch,
                  spatial_merge_size=merge, temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **qwen2_vl.placeholder_ids(tok))
    proc = qwen2_vl.processor(cfg, tok, pixels=(IMAGE * IMAGE, IMAGE * IMAGE), image_mean=MEAN, image_std=STD)
    return Qwen2VLForConditionalGeneration(cfg), proc


BUILDERS = {"llava": build_llava, "qwen2_vl": build_qwen2_vl}


def visual_tokens(model) -> torch.nn.Module:
    """The module whose output is the LLM's visual tokens ([n_images, 64, D] or [n_images * 64, D])."""
    inner = model.model
    return inner.multi_modal_projector if hasattr(inner, "multi_modal_projector") else inner.visual.merger

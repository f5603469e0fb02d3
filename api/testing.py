"""Tiny random models of every supported family, written to disk with a working processor.

    from tokensieve.testing import make_tiny
    path = make_tiny("llava", "/tmp/tiny-llava")
    engine = tokensieve.load(path)

Nothing is downloaded: the tokenizer is a word-level vocabulary built here, the image
processors are the PIL ones shipped with transformers. Weights are random (seeded), so
the answers are gibberish: these models exercise the machinery, not accuracy.
"""
from __future__ import annotations

import os

import torch

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>", "<|im_start|>", "<|im_end|>",
           "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = ("user assistant USER: ASSISTANT: system what is the colour color of shape object objects "
         "red green blue yellow orange purple white black circle square triangle star cross "
         "left right top bottom yes no how many a an in on image video frame first appeared there "
         "describe count which where big small 0 1 2 3 4 5 6 7 8 9 ? . ,").split()

# One chat template per family, in each family's own turn format (images first, then the text).
CHAT_TEMPLATES = {
    "llava": ("{% for m in messages %}{% if m['role'] == 'user' %}USER: "
              "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
              "{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
              "{% else %}ASSISTANT: {{ m['content'][0]['text'] }} </s> {% endif %}{% endfor %}"
              "{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
    "qwen": ("{% for m in messages %}<|im_start|> {{ m['role'] }} "
             "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
             "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
             "{% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
             "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"),
}
CHAT_TEMPLATES["onevision"] = (CHAT_TEMPLATES["qwen"].replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
                           .replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>"))


def make_tokenizer(extra_words: tuple[str, ...] = ()):
    """A word-level fast tokenizer (whitespace split) holding every family's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIAL + WORDS + list(extra_words)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})
    return tok


def _llama_text(vocab_size: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3, **kw)


def _clip_vision(image_size=32, patch_size=4):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=image_size, patch_size=patch_size)


def _build_llava(tok):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATES["llava"], num_additional_image_tokens=1)
    cfg = LlavaConfig(vision_config=_clip_vision(), text_config=_llama_text(len(tok)),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg), proc


def _build_llava_next(tok):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              chat_template=CHAT_TEMPLATES["llava"], num_additional_image_tokens=1)
    cfg = LlavaNextConfig(vision_config=_clip_vision(patch_size=8), text_config=_llama_text(len(tok)),
                          image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return LlavaNextForConditionalGeneration(cfg), proc


def _build_llava_onevision(tok):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor,
                              Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil

    pinpoints = [[32, 64], [64, 32], [64, 64]]
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    vp = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                   vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATES["onevision"],
                                   num_image_tokens=16)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                       pad_token_id=0, bos_token_id=2, eos_token_id=7)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=32, patch_size=8)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                               video_token_id=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                               vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints)
    return LlavaOnevisionForConditionalGeneration(cfg), proc


def _build_qwen(tok, v25: bool):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    geometry = dict(patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    ip, vp = Qwen2VLImageProcessorPil(**geometry), Qwen2VLVideoProcessor(**geometry)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in [("image_token_id", "<|image_pad|>"), (
        "video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=0, bos_token_id=2, eos_token_id=7,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]})
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if v25:
        vision.update(out_hidden_size=64, intermediate_size=64, window_size=16, fullatt_block_indexes=[1])
        vision.pop("embed_dim")
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=CHAT_TEMPLATES["qwen"])
        return Qwen2_5_VLForConditionalGeneration(cfg), proc
    vision.update(hidden_size=64)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=CHAT_TEMPLATES["qwen"])
    return Qwen2VLForConditionalGeneration(cfg), proc


_BUILDERS = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "llava_onevision": _build_llava_onevision,
    "qwen2_vl": lambda tok: _build_qwen(tok, v25=False),
    "qwen2_5_vl": lambda tok: _build_qwen(tok, v25=True),
}


def make_tiny(family: str, path: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny random ``family`` model (weights, config, tokenizer, processor) to ``path``; return the path."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family '{family}'; choose from {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    tok = make_tokenizer()
    model, processor = _BUILDERS[family](tok)
    with torch.no_grad():  # a visible spread in the logits, so greedy decoding is not all ties
        model.get_output_embeddings().weight.normal_(0, 0.5)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)

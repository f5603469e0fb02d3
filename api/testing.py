"""Tiny random models of every supported family, written to disk with a working processor.

    from tokensieve.testing import make_tiny
    path = make_tiny("llava", "/tmp/tiny-llava")
    engine = tokensieve.load(path)

Nothing is downloaded: the tokenizer is a word-level vocabulary built here, the image
processors are the PIL ones shipped with transformers. Weights are random (seeded), so
the answers are gibberish: these models exercise the machinery, not accuracy.

Each family's tiny model and chat template come from its adapter module (``tokensieve.engine.adapters``:
``tiny_model``, ``CHAT_TEMPLATE``); ``FAMILIES`` is the adapter registry's families, read when asked for.
"""
from __future__ import annotations

import os

import torch

from .engine.adapters import ADAPTERS, family_module

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>", "<|im_start|>", "<|im_end|>",
           "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = ("user assistant USER: ASSISTANT: system what is the colour color of shape object objects "
         "red green blue yellow orange purple white black circle square triangle star cross "
         "left right top bottom yes no how many a an in on image video frame first appeared there "
         "describe count which where big small 0 1 2 3 4 5 6 7 8 9 ? . ,").split()


def __getattr__(name: str):
    """``FAMILIES``: the adapter registry's families, in its order (read at each access: no copy kept here)."""
    if name == "FAMILIES":
        return tuple(ADAPTERS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def tokenizer_for(family: str, extra_words: tuple[str, ...] = ()):
    """``make_tokenizer(extra_words)`` holding ``family``'s placeholder tokens (its module's ``PLACEHOLDERS``):
    those not among ``SPECIAL`` are added as special tokens after the vocabulary (none for the shipped families)."""
    tok = make_tokenizer(extra_words)
    missing = [t for t in dict.fromkeys(family_module(family).PLACEHOLDERS.values()) if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": SPECIAL[4:] + missing})
    return tok


def make_tiny(family: str, path: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny random ``family`` model (weights, config, tokenizer, processor) to ``path``; return the path."""
    build = family_module(family).tiny_model  # ValueError naming the families for an unknown one
    torch.manual_seed(seed)
    tok = tokenizer_for(family)
    model, processor = build(tok)
    with torch.no_grad():  # a visible spread in the logits, so greedy decoding is not all ties
        model.get_output_embeddings().weight.normal_(0, 0.5)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)

"""The inference path, gpt-fast style: ``prefill``, ``decode_one_token``, ``sample``.

The model is called through its own forward with ``inputs_embeds``, explicit position ids,
a 2-D attention mask and a transformers ``DynamicCache`` - the same calls ``generate``
makes - plus the pruning state as one extra kwarg when a plan is active.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from .errors import InputError
from .state import STATE_KWARG, RequestState


@dataclass
class DecodeOptions:
    """Decoding settings. Greedy unless ``do_sample``; ``output_logits`` keeps each step's logits."""

    do_sample: bool = False
    output_logits: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "DecodeOptions":
        """Checked options: each one's type and range, named in the error (before any work)."""
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown generation option(s) {sorted(unknown)}; "
                             f"supported: plan, max_new_tokens, {', '.join(cls.__dataclass_fields__)}")
        for name in ("do_sample", "output_logits"):
            if name in kwargs and not isinstance(kwargs[name], bool):
                raise InputError(f"{name} must be True or False, got {kwargs[name]!r}")
        for name, low in (("top_k", 1), ("seed", 0)):
            v = kwargs.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise InputError(f"{name} must be an int >= {low}, got {v!r}")
        for name, ok, rule in (("temperature", lambda v: v > 0, "> 0"), ("top_p", lambda v: 0 < v <= 1, "in (0, 1]")):
            v = kwargs.get(name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                                  or not ok(v)):
                raise InputError(f"{name} must be a number {rule}, got {v!r}")
        if kwargs.get("seed", 0) is None or kwargs.get("temperature", 1.0) is None:
            raise InputError("seed and temperature take a value, not None")
        return cls(**kwargs)


def _state_kwargs(state: RequestState | None) -> dict:
    return {} if state is None else {STATE_KWARG: state}


def cache_kwargs(model, cache) -> dict:
    """The forward kwargs that pass ``cache``, under the name this transformers' forward takes:
    ``cache`` from 5.25 on (where ``past_key_values`` is deprecated, to be removed in 5.40),
    ``past_key_values`` before. Build it once per request batch; prefill and decode take it."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def prefill(model, embeds, attention_mask, position_ids, cache: dict, state: RequestState | None) -> torch.Tensor:
    """embeds [B, L, D], attention_mask [B, L], position_ids [B, L] or [P, B, L] -> logits [B, V] (last token).
    ``cache``: ``cache_kwargs(model, DynamicCache(...))``."""
    out = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=1, **cache, **_state_kwargs(state))
    return out.logits[:, -1].float()


def decode_one_token(model, embed_fn, token, attention_mask, position_ids, cache: dict, state: RequestState | None):
    """token [B]; attention_mask [B, T] (incl. this token); position_ids [..., B, 1] -> logits [B, V]."""
    if state is not None:
        state.start_decode(1, token.device)
    out = model(inputs_embeds=embed_fn(token[:, None]), attention_mask=attention_mask, position_ids=position_ids,
                **cache, **_state_kwargs(state))
    return out.logits[:, -1].float()


def forced_logprob(model, embed_fn, tokens: list[int], logits, attention_mask, position_ids, cache: dict,
                   state: RequestState | None) -> tuple[float, bool]:
    """Feed ``tokens`` after a prefill (batch of one; logits [1, V], position_ids [..., 1, 1] of the last
    token) -> (sum of their log-probabilities, whether each was the argmax)."""
    total, greedy = 0.0, True
    for step, tok in enumerate(tokens):
        logp = logits[0].log_softmax(-1)
        total += float(logp[tok])
        greedy &= int(logp.argmax()) == tok
        if step == len(tokens) - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(1, 1)], dim=1)
        position_ids = next_positions(position_ids)
        token = torch.tensor([tok], device=logits.device)
        logits = decode_one_token(model, embed_fn, token, attention_mask, position_ids, cache, state)
    return total, greedy


def sample(logits: torch.Tensor, s: DecodeOptions, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]."""
    if not s.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k is not None:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).flatten().to(logits.device)


def next_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Positions of the next token: the last position + 1 on every axis ([..., B, L] -> [..., B, 1])."""
    return position_ids[..., -1:] + 1


def end_of_sequence_ids(generation_eos, tokenizer_eos) -> set[int]:
    """The ids that end an answer: the generation config's (an int or a list), else the tokenizer's;
    empty when neither names one (answers then run to max_new_tokens)."""
    ids = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    ids = ids or [tokenizer_eos]
    return {int(i) for i in ids if i is not None}

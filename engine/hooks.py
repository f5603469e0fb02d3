"""Hooks on one model instance: forward pre-hooks on the decoder layers (and vision layers).

They act only when a call passes a ``tokensieve_state``; without one the model is untouched.
``install`` returns the handles; the Engine removes them on ``close``.
"""
from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from .state import STATE_KWARG


def _llm_hook(layer: int):
    def hook(module, args, kwargs):
        state = kwargs.get(STATE_KWARG)
        if state is None:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        hidden = state.before_llm_layer(layer, hidden, kwargs)
        return (hidden, *args[1:]), kwargs

    return hook


def _vision_hook(layer: int, prefix: int):
    def hook(module, args, kwargs):
        state = kwargs.get(STATE_KWARG)
        if state is None or layer not in state.vision_stages:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return (state.before_vision_layer(layer, hidden, prefix), *args[1:]), kwargs

    return hook


def install(llm_layers: nn.ModuleList, vision_layers: nn.ModuleList | None, vision_prefix: int) -> list[RemovableHandle]:
    handles = [m.register_forward_pre_hook(_llm_hook(i), with_kwargs=True) for i, m in enumerate(llm_layers)]
    for i, m in enumerate(vision_layers or []):
        handles.append(m.register_forward_pre_hook(_vision_hook(i, vision_prefix), with_kwargs=True))
    return handles

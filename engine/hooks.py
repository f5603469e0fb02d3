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
    """Before vision layer ``layer``: a vision stage's pruning, then, once a keep=auto stage padded the tower batch
    (a budget per image), the mask hiding the padded keys, handed to the layer as its ``attention_mask``."""
    def hook(module, args, kwargs):
        state = kwargs.get(STATE_KWARG)
        if state is None or (layer not in state.vision_stages and state.tower_mask is None):
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        hidden = state.before_vision_layer(layer, hidden, prefix)
        mask = state.tower_attention_mask()
        if mask is None:
            return (hidden, *args[1:]), kwargs
        if len(args) > 1:  # (hidden_states, attention_mask, ...) as CLIP's encoder passes them
            return (hidden, mask, *args[2:]), kwargs
        return (hidden,), {**kwargs, "attention_mask": mask}

    return hook


def _tower_record_hook(layer: int):
    """A tower attention module whose attention function never sees the call's kwargs (SigLIP in transformers
    5.x): q, k, v recomputed from its input with its own projections, at the layers a stage records only."""
    def hook(module, args, kwargs):
        state = kwargs.get(STATE_KWARG)
        if state is None or layer not in state.tower_wants:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        shape = (*x.shape[:-1], -1, module.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (module.q_proj, module.k_proj, module.v_proj))
        state.record_vision(layer, q, k, v, module.scale)
        return None

    return hook


def install_tower_records(attention_modules) -> list[RemovableHandle]:
    """Forward pre-hooks on a CLS-free tower's attention modules that record the signals asked of them."""
    return [m.register_forward_pre_hook(_tower_record_hook(i), with_kwargs=True) for i, m in enumerate(attention_modules)]


def install(llm_layers: nn.ModuleList, vision_layers: nn.ModuleList | None, vision_prefix: int) -> list[RemovableHandle]:
    handles = [m.register_forward_pre_hook(_llm_hook(i), with_kwargs=True) for i, m in enumerate(llm_layers)]
    for i, m in enumerate(vision_layers or []):
        handles.append(m.register_forward_pre_hook(_vision_hook(i, vision_prefix), with_kwargs=True))
    return handles

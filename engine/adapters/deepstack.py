"""DeepStack (Qwen3-VL): visual features the LLM adds to its hidden states after its first layers.

transformers' ``Qwen3VLTextModel`` adds ``deepstack_visual_embeds[i]`` to the hidden states at
``visual_pos_masks`` right after decoder layer i (``_deepstack_process``), for i < the number of
DeepStack layers. The engine calls the model with ``inputs_embeds`` (the visual features already placed),
so the model's own forward receives no DeepStack features; instead one ``DeepStack`` per call carries them
as the ``tokensieve_deepstack`` forward kwarg (the prefill only), and a forward hook on each of those
decoder layers adds them to the layer's output at the visual tokens alive there:

- no plan: every visual token of the processor's layout (the same sums as ``_deepstack_process``);
- with a plan: the tokens the state still holds (``state.vis_orig``), so a pre-LLM stage's dropped tokens
  and an LLM stage before a DeepStack layer both leave their features out; a token that stands for several
  originals after a merge (``state.owner``) receives the mean of their DeepStack features.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

DEEPSTACK_KWARG = "tokensieve_deepstack"


@dataclass
class DeepStack:
    """One call's DeepStack features: filled by the adapter's encoders, then laid out per request."""

    n_layers: int
    images: list = field(default_factory=list)  # per image: [n_layers, N_i, D]
    videos: list = field(default_factory=list)  # per video: [n_layers, N_v, D]
    per_request: list = field(default_factory=list)  # per request: [n_layers, N_vis_b, D] (original order) or None
    vis_orig: torch.Tensor | None = None  # [B, L] original visual index of each prefill slot (-1: text, pad)

    def forward_kwargs(self, batch, input_ids: torch.Tensor, visual_ids: tuple[int, ...]) -> dict:
        """The prefill's extra forward kwarg, with each request's features in its visual-token order.
        ``input_ids`` [B, L]: the processor's layout (used when no plan prunes it)."""
        from ..batch import assemble

        self.per_request = []
        for b in range(len(batch.reqs)):
            layers = [assemble([im[i] for im in self.images], [v[i] for v in self.videos], batch, b)
                      for i in range(self.n_layers)]
            self.per_request.append(None if layers[0] is None else torch.stack(layers))
        vis = torch.isin(input_ids, torch.tensor(visual_ids, device=input_ids.device))
        self.vis_orig = torch.where(vis, vis.long().cumsum(1) - 1, -1)
        return {DEEPSTACK_KWARG: self}

    def add(self, layer: int, hidden: torch.Tensor, state) -> torch.Tensor:
        """hidden [B, S, D] (decoder layer ``layer``'s output) + its DeepStack features at the live visual tokens."""
        vis_orig = self.vis_orig if state is None else state.vis_orig
        out = hidden.clone()
        for b, feats in enumerate(self.per_request):
            slots = (vis_orig[b] >= 0).nonzero().flatten()
            if feats is None or not slots.numel():
                continue
            orig = vis_orig[b, slots].to(feats.device)
            x = feats[layer] if state is None else group_mean(feats[layer], state.owner[b].to(feats.device))
            rows = orig if state is None else state.owner[b].to(feats.device)[orig]
            out[b, slots] = out[b, slots] + x[rows].to(out.device, out.dtype)
        return out


def group_mean(x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """x [N, D] per original token, owner [N] (alive position or -1) -> [n_alive, D] mean per alive token
    (a token that was never merged gets its own row exactly)."""
    live = owner >= 0
    n = int(owner.max()) + 1 if bool(live.any()) else 0
    total = x.new_zeros(n, x.shape[-1]).index_add_(0, owner[live], x[live])
    count = torch.bincount(owner[live], minlength=n).to(x.dtype)
    return total / count[:, None]


def _after_layer(layer: int, state_kwarg: str):
    def hook(module, args, kwargs, output):
        stack = kwargs.get(DEEPSTACK_KWARG)
        if stack is None or layer >= stack.n_layers:
            return None
        return stack.add(layer, output, kwargs.get(state_kwarg))

    return hook


def install(llm_layers: nn.ModuleList, n_layers: int, state_kwarg: str) -> list[RemovableHandle]:
    """Forward hooks on decoder layers 0..n_layers-1 of this model instance (they act only on a call that
    passes a ``DeepStack``); their handles."""
    return [llm_layers[i].register_forward_hook(_after_layer(i, state_kwarg), with_kwargs=True)
            for i in range(n_layers)]

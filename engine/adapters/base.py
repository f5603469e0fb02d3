"""What the engine needs to know about a model family, behind one small class.

An adapter never copies a transformers forward: it calls the model's own public pieces
(``get_image_features``, ``get_rope_index``, the input embeddings) and names the modules
the engine hooks (decoder layers, vision encoder layers).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class Adapter:
    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    vision_prefix: ClassVar[int | None] = None  # tokens before the patches in the tower (CLS); None: no vision stages
    cls_tower: ClassVar[bool] = False  # the tower has a CLS token whose attention the engine can record
    hooked_tower: ClassVar[bool] = False  # the engine hooks the tower's layers (``vision_layers`` is not None)
    stacks_videos: ClassVar[bool] = False  # the processor stacks a batch's videos in one tensor: one frame count each
    feature_prefix: int = 0  # non-patch tokens (a CLS hidden state) before each image's patches in the LLM features
    video_with_images: ClassVar[bool] = True  # one processor call takes images and native videos together
    rope_layout: ClassVar[str] = "half"  # the LLM's RoPE pairs: "half" (i, i + r/2), "interleaved" (2i, 2i + 1)

    def __init__(self, model: nn.Module, processor):
        self.model = model
        self.processor = processor
        self.config = model.config

    # ---- modules --------------------------------------------------------------------------
    @property
    def text_config(self):
        return self.config.get_text_config()

    @property
    def llm_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def llm_norm(self) -> nn.Module:
        """The LLM's final norm (before the LM head)."""
        return self.model.model.language_model.norm

    @property
    def vision_layers(self) -> nn.ModuleList | None:
        return None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L, D]"""
        return self.model.get_input_embeddings()(input_ids)

    # ---- prompts ----------------------------------------------------------------------------
    @property
    def image_token(self) -> str:
        return self.processor.image_token

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids that the processor expands into visual tokens (images, then video)."""
        return (self.config.image_token_id,) + ((self.config.video_token_id,) if self.video_token else ())

    def batch_images(self, per_request: list[list]) -> list:
        """The processor's ``images`` argument for a batch from each request's images: one flat list by default."""
        return [im for ims in per_request for im in ims]

    def image_settings(self) -> dict:
        """Image settings given to the processor call (where the processor's own defaults would override its image
        processor's saved ones): none by default."""
        return {}

    @property
    def video_token(self) -> str | None:
        """The prompt placeholder of a native video, or None: the family takes a video as frames."""
        return None

    def layout_inputs(self, reqs) -> dict:
        """Entries added to the processor's output for this family's layout methods (``image_coords``, ...) from
        the checked requests (their images, their native video), where that output lacks them; each must be an
        input the model's forward takes (InternVL: ``image_sizes``, which sets its tiling) or that the engine drops
        before the model (Gemma 3: ``num_crops``, which the processor computes, then leaves out). Default: none."""
        return {}

    def video_token_mask(self, inputs, reqs) -> list[torch.Tensor]:
        """Per batch row, [N_vis] bool over its visual tokens in sequence order: the native video's (``reqs``: the
        checked requests, in row order)."""
        ids = inputs["input_ids"]
        vis = torch.isin(ids, torch.tensor(self.visual_token_ids))
        video_id = self.config.video_token_id if self.video_token else None
        return [ids[b][vis[b]] == video_id if video_id is not None else torch.zeros(int(vis[b].sum()), dtype=torch.bool)
                for b in range(ids.shape[0])]

    # ---- native video (families with a video_token) -------------------------------------------
    def video_inputs(self, videos: list) -> dict:
        """Processor kwargs for decoded videos (``engine.video.DecodedVideo``): frames and their metadata."""
        import numpy as np
        from transformers.video_utils import VideoMetadata

        return {"videos": [np.stack([np.asarray(f) for f in v.frames]) for v in videos],
                "video_metadata": [VideoMetadata(total_num_frames=v.total_frames, fps=v.video_fps,
                                                 frames_indices=list(v.indices)) for v in videos]}

    def encode_videos(self, inputs, **kwargs) -> list[torch.Tensor]:
        """Processor output -> one [N_v, D] feature tensor per video, in the order given (``kwargs``: the
        engine's recording state, for families whose tower it hooks)."""
        raise NotImplementedError

    def video_tower_to_tokens(self, values: torch.Tensor, inputs) -> list[torch.Tensor]:
        """Per-frame tower values [n_frames, P, C] of every video -> one [N_v, C] per video, aligned with its LLM
        tokens (families whose video tower the engine hooks)."""
        raise NotImplementedError

    def video_coords(self, inputs) -> list[torch.Tensor]:
        """One [N_v, 3] tensor (frame, row, col) per video; a frame is the unit of the model's token grid
        (a temporal patch of two frames on Qwen). Non-patch tokens (newlines) get col = grid width."""
        raise NotImplementedError

    def video_tower_sequences(self, inputs) -> list[list[int]]:
        """Per video, the length of every sequence it puts through the vision tower (for metering)."""
        raise NotImplementedError

    # ---- vision -----------------------------------------------------------------------------
    def encode_images(self, inputs, **kwargs) -> list[torch.Tensor]:
        """Processor output -> one [N_i, D] feature tensor per image, in the order given."""
        raise NotImplementedError

    def encode_images_and_tower(self, inputs, **kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """``encode_images`` plus, per image, the projector's input [N_i, D_tower] aligned with the features
        (for pruners that merge before the projector), or None where the family cannot give it."""
        return self.encode_images(inputs, **kwargs), None

    def project(self, tower_tokens: torch.Tensor) -> torch.Tensor:
        """[k, D_tower] projector inputs -> [k, D] LLM features (families that give ``encode_images_and_tower``)."""
        raise NotImplementedError

    def image_coords(self, inputs) -> list[torch.Tensor]:
        """One [N_i, 3] tensor (item, row, col) per image: each LLM-side token's place in its grid.

        Tokens that are not patches (e.g. row-end newline tokens) get col = grid width.
        """
        raise NotImplementedError

    @property
    def feature_layer(self) -> int:
        """Index of the vision layer whose output the LLM features are taken from (its attention is scored)."""
        n = len(self.vision_layers)
        fl = self.config.vision_feature_layer
        fl = fl if isinstance(fl, int) else fl[-1]
        return n + fl if fl < 0 else fl - 1

    def tower_attention_modules(self) -> list[nn.Module]:
        """The self-attention module of every vision layer (cls_tower families)."""
        return [layer.self_attn for layer in self.vision_layers]

    def tower_sequences(self, inputs) -> list[list[int]]:
        """Per image, the length of every sequence it puts through the vision tower (for metering)."""
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2 + (self.vision_prefix or (1 if self.cls_tower else 0))
        return [[n] * t for t in self.tiles_per_image(inputs)]

    def tiles_per_image(self, inputs) -> list[int]:
        """How many tower passes (tiles) each image takes."""
        return [1] * len(self.image_coords(inputs))

    def tower_to_tokens(self, values: torch.Tensor, inputs) -> list[torch.Tensor]:
        """Per-patch tower values [n_tiles, P, C] -> one [N_i, C] per image, aligned with its LLM tokens."""
        return list(values)

    def vision_patch_coords(self, inputs) -> list[torch.Tensor]:
        """[P, 3] per image: coords of the patches inside the vision tower (vision stages only)."""
        return self.image_coords(inputs)

    # ---- features the LLM adds after its first layers (DeepStack) -------------------------------
    def new_deepstack(self):
        """A per-call carrier of the visual features the LLM adds after its first layers (``deepstack.DeepStack``,
        filled by ``encode_images`` / ``encode_videos`` given it as ``stack=``), or None: the family has none."""
        return None

    def install_hooks(self, state_kwarg: str) -> list:
        """Hooks of this family's own on the model instance (beyond the engine's); their handles."""
        return []

    # ---- attention masks ----------------------------------------------------------------------
    own_masks: ClassVar[bool] = False  # True: whenever a plan runs, every LLM layer gets the engine's mask (from
    # layer 0, not only after the first LLM stage), by ``allowed`` / ``visible_keys``

    def forward_inputs(self, inputs) -> dict:
        """Extra prefill inputs of the model's forward, each [B, L] over the processor's layout (the engine gathers
        them as it gathers the tokens), e.g. what the model builds its own masks from."""
        return {}

    def attention_groups(self, inputs) -> torch.Tensor | None:
        """[B, L] per slot of the processor's layout: the group whose tokens attend to each other both ways
        (an image's tokens), -1 for none; None: the family's attention is plainly causal."""
        return None

    def mask_kind(self, layer: int) -> str:
        """LLM layers of one kind share a rule (and, within one stage's segment, one mask)."""
        return "causal"

    def allowed(self, kind: str, q_seq: torch.Tensor, k_seq: torch.Tensor, q_group: torch.Tensor | None,
                k_group: torch.Tensor | None) -> torch.Tensor:
        """[B, Sq, Sk] which keys each query may attend to (before padding), from the tokens' original slots
        ``q_seq`` [B, Sq], ``k_seq`` [B, Sk] and their ``attention_groups`` (or None): causal by default."""
        return k_seq[:, None, :] <= q_seq[:, :, None]

    def visible_keys(self, kind: str, n_cached: int, n_new: int) -> int:
        """How many keys a layer's cache returns after taking ``n_new`` tokens on ``n_cached`` (the newest ones):
        all of them by default."""
        return n_cached + n_new

    # ---- positions --------------------------------------------------------------------------
    # Why this family's pruned prompts keep their original positions (an explicit ``positions=contiguous`` is
    # refused with it, a default one runs as ``original``); None: both conventions run (1-D positions).
    contiguous_refused: ClassVar[str | None] = None

    def position_ids(self, inputs) -> torch.Tensor:
        """Prefill position ids exactly as ``generate`` builds them: [B, L], or [P, B, L] for M-RoPE."""
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def with_input_of(module: nn.Module, call):
    """(``call()``'s result, the first input ``module`` received during it), caught by a forward pre-hook on this
    module instance, removed when the call ends (a projector's input, for pruners that merge before it)."""
    caught = []
    hook = module.register_forward_pre_hook(lambda m, args: caught.append(args[0]))
    try:
        out = call()
    finally:
        hook.remove()
    return out, caught[0]


def grid_coords(h: int, w: int, item: int = 0, newline: bool = False) -> torch.Tensor:
    """Raster coords [h*w (+h), 3] of an h x w grid; with ``newline`` one extra token ends each row."""
    cols = w + 1 if newline else w
    r = torch.arange(h).repeat_interleave(cols)
    c = torch.arange(cols).repeat(h)
    return torch.stack([torch.full_like(r, item), r, c], dim=1)

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
    feature_prefix: int = 0  # non-patch tokens (a CLS hidden state) before each image's patches in the LLM features
    video_with_images: ClassVar[bool] = True  # one processor call takes images and native videos together

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

    @property
    def video_token(self) -> str | None:
        """The prompt placeholder of a native video, or None: the family takes a video as frames."""
        return None

    def processor_images(self, per_request: list[list]) -> list | None:
        """The processor's ``images=`` for these requests' images (one list per request): flat by default."""
        images = [im for ims in per_request for im in ims]
        return images or None

    def video_token_mask(self, visual_ids: torch.Tensor, native_video: bool) -> torch.Tensor:
        """[N_vis] placeholder ids of one request's visual tokens -> [N_vis] bool: its native video's tokens."""
        if not self.video_token:
            return torch.zeros(visual_ids.shape, dtype=torch.bool)
        return visual_ids == self.config.video_token_id

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

    # ---- positions --------------------------------------------------------------------------
    def position_ids(self, inputs) -> torch.Tensor:
        """Prefill position ids exactly as ``generate`` builds them: [B, L], or [P, B, L] for M-RoPE."""
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def grid_coords(h: int, w: int, item: int = 0, newline: bool = False) -> torch.Tensor:
    """Raster coords [h*w (+h), 3] of an h x w grid; with ``newline`` one extra token ends each row."""
    cols = w + 1 if newline else w
    r = torch.arange(h).repeat_interleave(cols)
    c = torch.arange(cols).repeat(h)
    return torch.stack([torch.full_like(r, item), r, c], dim=1)

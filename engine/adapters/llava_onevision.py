"""LLaVA-OneVision: SigLIP tower (no CLS token), anyres packing with newlines, like NeXT; native video."""
import math

import torch

from .base import grid_coords
from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    cls_tower = False  # SigLIP has no CLS token: CLS-based pruners use their surrogate

    def _feature_kwargs(self, inputs) -> dict:
        kw = super()._feature_kwargs(inputs)
        if "batch_num_images" in inputs:
            kw["batch_num_images"] = inputs["batch_num_images"]
        return kw

    def tiles_per_image(self, inputs) -> list[int]:
        tiles = super().tiles_per_image(inputs)
        if "batch_num_images" in inputs:  # several images in one request: base tile only
            single = [int(n) == 1 for n in inputs["batch_num_images"] for _ in range(int(n))]
            tiles = [t if s else 1 for t, s in zip(tiles, single)]
        return tiles

    def _pack(self, coord_feats, inputs, newline):
        return self.model.model.pack_image_features(coord_feats, inputs["image_sizes"], image_newline=newline,
                                                    vision_aspect_ratio=self.config.vision_aspect_ratio)

    # ---- native video: <video>, each frame's grid pooled 2x (bilinear), one newline after all frames ----
    @property
    def video_token(self) -> str:
        return self.processor.video_token

    def encode_videos(self, inputs) -> list[torch.Tensor]:
        kw = LlavaNextAdapter._feature_kwargs(self, inputs)  # get_video_features takes no batch_num_images
        out = self.model.model.get_video_features(inputs["pixel_values_videos"], **kw)
        return list(out.pooler_output)

    def _pooled_side(self) -> tuple[int, int]:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, math.ceil(side / 2)  # the model's apply_pooling: ceil(side / 2) per axis

    def video_coords(self, inputs) -> list[torch.Tensor]:
        _, p = self._pooled_side()
        n_videos, n_frames = inputs["pixel_values_videos"].shape[:2]
        grid = torch.cat([grid_coords(p, p, item=f) for f in range(n_frames)])
        coords = torch.cat([grid, torch.tensor([[n_frames - 1, p - 1, p]])])  # the newline token ends the video
        return [coords.clone() for _ in range(n_videos)]

    def video_tower_sequences(self, inputs) -> list[list[int]]:
        side, _ = self._pooled_side()
        n_videos, n_frames = inputs["pixel_values_videos"].shape[:2]
        return [[side * side] * n_frames for _ in range(n_videos)]

"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower with a CLS token, one token per patch."""

import torch

from .base import Adapter, grid_coords


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    vision_prefix = 1  # the CLS token
    cls_tower = True

    @property
    def vision_layers(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def _feature_kwargs(self) -> dict:
        return dict(vision_feature_layer=self.config.vision_feature_layer,
                    vision_feature_select_strategy=self.config.vision_feature_select_strategy)

    def encode_images(self, inputs, **kwargs) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], **self._feature_kwargs(), **kwargs)
        return list(out.pooler_output)

    def image_coords(self, inputs) -> list[torch.Tensor]:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return [grid_coords(side, side) for _ in range(inputs["pixel_values"].shape[0])]

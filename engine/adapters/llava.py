"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower with a CLS token, one token per patch.

With ``vision_feature_select_strategy="full"`` the CLS hidden state goes to the projector too: it is
the image's first visual token, placed as a non-patch token (col = grid width) in row 0.
"""

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

    @property
    def feature_prefix(self) -> int:
        """Tokens before the patches among each image's LLM features: 1 (CLS) for the "full" strategy."""
        return int(self.config.vision_feature_select_strategy == "full")

    def _feature_kwargs(self) -> dict:
        return dict(vision_feature_layer=self.config.vision_feature_layer,
                    vision_feature_select_strategy=self.config.vision_feature_select_strategy)

    def encode_images(self, inputs, **kwargs) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], **self._feature_kwargs(), **kwargs)
        return list(out.pooler_output)

    def encode_images_and_tower(self, inputs, **kwargs):
        """The features, and the projector's input (the feature layer's hidden states) caught by a forward
        pre-hook on this model's projector for the duration of the call."""
        caught = []
        hook = self.model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: caught.append(args[0]))
        try:
            feats = self.encode_images(inputs, **kwargs)
        finally:
            hook.remove()
        return feats, list(caught[0])

    def project(self, tower_tokens: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(tower_tokens)

    def image_coords(self, inputs) -> list[torch.Tensor]:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        patches = grid_coords(side, side)
        if self.feature_prefix:
            patches = torch.cat([torch.tensor([[0, 0, side]]), patches])
        return [patches.clone() for _ in range(inputs["pixel_values"].shape[0])]

    def vision_patch_coords(self, inputs) -> list[torch.Tensor]:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return [grid_coords(side, side) for _ in range(inputs["pixel_values"].shape[0])]

    def tower_to_tokens(self, values: torch.Tensor, inputs) -> list[torch.Tensor]:
        """Per-patch values [n, P, C] -> per image [N_i, C]; the CLS token ("full") gets 0, like a non-patch token."""
        if self.feature_prefix:
            values = torch.cat([values.new_zeros(values.shape[0], 1, values.shape[-1]), values], 1)
        return list(values)

"""LLaVA-NeXT (anyres): a base tile plus an unpadded high-resolution grid with row-end newline tokens.

The token layout is taken from the model itself: the model's own ``pack_image_features``
is run on a tensor of (item, row, col) coordinates instead of features, so the coords
follow whatever tiling, unpadding (and, for OneVision, interpolation) the model does.
"""
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .base import Adapter


class LlavaNextAdapter(Adapter):
    family = "llava_next"
    model_types = ("llava_next",)
    cls_tower = True

    @property
    def vision_layers(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def _feature_kwargs(self, inputs) -> dict:
        return dict(vision_feature_layer=self.config.vision_feature_layer,
                    vision_feature_select_strategy=self.config.vision_feature_select_strategy)

    def encode_images(self, inputs, **kwargs) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                  **self._feature_kwargs(inputs), **kwargs)
        return list(out.pooler_output)

    def tiles_per_image(self, inputs) -> list[int]:
        vc = self.config.vision_config
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints,
                                          patch_size=vc.image_size) for s in inputs["image_sizes"]]

    def _pack(self, coord_feats, inputs, newline):
        return self.model.model.pack_image_features(coord_feats, inputs["image_sizes"],
                                                    vision_feature_select_strategy=self.config.vision_feature_select_strategy,
                                                    image_newline=newline)

    def image_coords(self, inputs) -> list[torch.Tensor]:
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        feats = []
        for n in self.tiles_per_image(inputs):
            tiles = [torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3)]
            tiles += [torch.stack([torch.ones_like(r), r, c], -1).reshape(-1, 3) for _ in range(n - 1)]
            feats.append(torch.stack(tiles).float())  # [n_tiles, side*side, 3]; tile rows fixed below
        packed, _ = self._pack(feats, inputs, torch.full((3,), -1.0))
        return [_fix_coords(p) for p in packed]

    def tower_to_tokens(self, values: torch.Tensor, inputs) -> list[torch.Tensor]:
        """Pack per-tile values exactly as the features are packed; newline tokens get 0."""
        per_image = list(torch.split(values.float(), self.tiles_per_image(inputs)))
        packed, _ = self._pack(per_image, inputs, torch.zeros(values.shape[-1]))
        return list(packed)


def _fix_coords(p: torch.Tensor) -> torch.Tensor:
    """Packed coords [N, 3] -> long (item, row, col). Grid positions are recomputed from the packed layout:
    item 0 is the base tile in raster order; item 1 the high-res grid, rows ending at newline tokens."""
    p = p.round().long()
    newline = p[:, 0] < 0
    out = torch.zeros_like(p)
    base = (p[:, 0] == 0) & ~newline
    n_base = int(base.sum())
    side = int(round(n_base ** 0.5)) or 1
    out[:n_base, 1], out[:n_base, 2] = torch.arange(n_base) // side, torch.arange(n_base) % side
    row = col = 0
    for i in range(n_base, p.shape[0]):
        out[i] = torch.tensor([1, row, col])
        col += 1
        if newline[i]:
            row, col = row + 1, 0
    return out

"""LLaVA-NeXT (anyres): a base tile plus an unpadded high-resolution grid with row-end newline tokens.

The token layout is taken from the model itself: the model's own ``pack_image_features``
is run on a tensor of (item, row, col) coordinates instead of features, so the coords
follow whatever tiling, unpadding (and, for OneVision, interpolation) the model does.
"""
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .base import Adapter
from .llava import CHAT_TEMPLATE, PLACEHOLDERS, tiny_clip_vision, tiny_llama_text  # noqa: F401 (the family's)


class LlavaNextAdapter(Adapter):
    family = "llava_next"
    model_types = ("llava_next",)
    cls_tower = True
    hooked_tower = True

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


# ---- the family's test, world and bench models (read by tokensieve.testing and eval/; see adapters/__init__.py) ----
# PLACEHOLDERS and CHAT_TEMPLATE: LLaVA-1.5's (imported above)
BENCH = {"model": "llava-next-7b", "image": (672, 336)}  # eval/bench/configs/llava-next-7b.json; base tile + 2 tiles


def processor(config, tok, **image):
    """A processor of ``config``'s geometry (the tower's tile size and patch, the model's tilings, a CLS token)
    for the test tokenizer ``tok``; ``image``: extra image-processor settings."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    vc = config.vision_config
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": vc.image_size},
                                    crop_size={"height": vc.image_size, "width": vc.image_size},
                                    image_grid_pinpoints=config.image_grid_pinpoints, **image)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=vc.patch_size, chat_template=CHAT_TEMPLATE,
                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                              num_additional_image_tokens=1)


def tiny_model(tok):
    """(tiny random model, processor) for ``tokensieve.testing.make_tiny``: 32 px tiles of 4 x 4 patches + CLS."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(vision_config=tiny_clip_vision(patch_size=8), text_config=tiny_llama_text(len(tok)),
                          image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return LlavaNextForConditionalGeneration(cfg), processor(cfg, tok)

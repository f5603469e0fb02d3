"""LLaVA-OneVision: SigLIP tower (no CLS token), anyres packing with newlines, like NeXT."""
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

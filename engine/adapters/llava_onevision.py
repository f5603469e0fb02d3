"""LLaVA-OneVision: SigLIP tower (no CLS token), anyres packing with newlines, like NeXT; native video."""
import math

import torch

from .base import grid_coords
from .llava_next import LlavaNextAdapter
from .qwen2_vl import CHAT_TEMPLATE as _QWEN_TEMPLATE


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    cls_tower = False  # SigLIP has no CLS token: CLS-based pruners use their surrogate
    hooked_tower = True
    stacks_videos = True  # pixel_values_videos [n_videos, frames, C, H, W]

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

    def encode_videos(self, inputs, **kwargs) -> list[torch.Tensor]:
        kw = LlavaNextAdapter._feature_kwargs(self, inputs)  # get_video_features takes no batch_num_images
        out = self.model.model.get_video_features(inputs["pixel_values_videos"], **kw, **kwargs)
        return list(out.pooler_output)

    def video_tower_to_tokens(self, values: torch.Tensor, inputs) -> list[torch.Tensor]:
        """[n_videos * frames, side^2, C] -> per video [frames * pooled^2 + 1, C]: pooled as the features are
        (the model's ``apply_pooling``: bilinear to ceil(side / 2)); the newline token gets 0."""
        n_videos, n_frames = inputs["pixel_values_videos"].shape[:2]
        pooled = self.model.model.apply_pooling(values.float()).reshape(n_videos, -1, values.shape[-1])
        return [torch.cat([v, v.new_zeros(1, v.shape[-1])]) for v in pooled]

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


# ---- the family's test, world and bench models (read by tokensieve.testing and eval/; see adapters/__init__.py) ----
PLACEHOLDERS = {"image_token_id": "<image>", "video_token_id": "<video>"}  # config field -> test tokenizer token
CHAT_TEMPLATE = (_QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")  # Qwen2's turns
                 .replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>"))
BENCH = {"model": "llava-onevision-7b", "video": (32, 384, 384)}  # eval/bench/configs/llava-onevision-7b.json; frames


def processor(config, tok, **image):
    """A processor of ``config``'s geometry (the tower's square tile, the model's tilings, one token per patch,
    no CLS) for the test tokenizer ``tok``; ``image``: extra image-processor settings."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    vc = config.vision_config
    size = {"height": vc.image_size, "width": vc.image_size}
    ip = LlavaOnevisionImageProcessorPil(size=size, image_grid_pinpoints=config.image_grid_pinpoints, **image)
    return LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(
        size=size), vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=CHAT_TEMPLATE,
        num_image_tokens=(vc.image_size // vc.patch_size) ** 2)


def tiny_model(tok):
    """(tiny random model, processor) for ``tokensieve.testing.make_tiny``: SigLIP on 32 px tiles of 4 x 4 patches,
    Qwen2 LM (width 64, 4 layers)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                       pad_token_id=0, bos_token_id=2, eos_token_id=7)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=32, patch_size=8)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                               video_token_id=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                               vision_feature_select_strategy="full", image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return LlavaOnevisionForConditionalGeneration(cfg), processor(cfg, tok)

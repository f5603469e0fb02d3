"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower with a CLS token, one token per patch.

With ``vision_feature_select_strategy="full"`` the CLS hidden state goes to the projector too: it is
the image's first visual token, placed as a non-patch token (col = grid width) in row 0.
"""

import torch

from .base import Adapter, grid_coords, with_input_of


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    vision_prefix = 1  # the CLS token
    cls_tower = True
    hooked_tower = True

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
        feats, tower = with_input_of(self.model.model.multi_modal_projector, lambda: self.encode_images(inputs, **kwargs))
        return feats, list(tower)

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


# ---- the family's test, world and bench models (read by tokensieve.testing and eval/; see adapters/__init__.py) ----
PLACEHOLDERS = {"image_token_id": "<image>"}  # config field -> the word-level test tokenizer's placeholder token
CHAT_TEMPLATE = (  # the test tokenizer's chat template in LLaVA's turn format (images first, then the text)
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {{ m['content'][0]['text'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
BENCH = {"model": "llava-1.5-7b", "image": (336, 336)}  # eval/bench/configs/llava-1.5-7b.json; image width x height


def processor(config, tok, **image):
    """A processor of ``config``'s geometry (square crop of the tower's image size, its patch, a CLS token) for
    the test tokenizer ``tok``; ``image``: extra image-processor settings (``image_mean``, ``image_std``)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vc = config.vision_config
    ip = CLIPImageProcessorPil(size={"shortest_edge": vc.image_size},
                               crop_size={"height": vc.image_size, "width": vc.image_size}, **image)
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=vc.patch_size, chat_template=CHAT_TEMPLATE,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=1)


def tiny_llama_text(vocab_size: int, **kw):
    """The tiny test models' Llama LM: width 64, 4 layers."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3, **kw)


def tiny_clip_vision(image_size: int = 32, patch_size: int = 4):
    """The tiny test models' CLIP tower: width 32, 3 layers."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=image_size, patch_size=patch_size)


def tiny_model(tok):
    """(tiny random model, processor) for ``tokensieve.testing.make_tiny``: 32 px images, 8 x 8 patches + CLS."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=tiny_clip_vision(), text_config=tiny_llama_text(len(tok)),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg), processor(cfg, tok)

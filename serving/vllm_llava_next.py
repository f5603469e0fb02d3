"""LLaVA-NeXT in vLLM with tokensieve's per-request plans: subclasses of vLLM's own processor and model.

Registered by ``vllm_plugin.register`` for ``LlavaNextForConditionalGeneration``. An image is one item: its
base tile, then the unpadded high-resolution grid with a newline token ending each row, as vLLM packs them
(``_merge_image_patch_embeddings``, "spatial_unpad"). A plan acts on the packed tokens, as tokensieve's engine
does. The token layout (each token's tile, row and column) comes from vLLM's own packing run on a tensor of
coordinates instead of features, with -1 as the newline's value, then the engine's ``_fix_coords`` numbering:
the same trick, and so the same coordinates, as the engine's LLaVA-NeXT adapter (on transformers' packing).
Tower signals (CLS pruners) are recorded as on LLaVA-1.5 (``vllm_llava``), per tile, and packed the same way
(newline tokens get 0, the engine's ``tower_to_tokens``).
"""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration, LlavaNextMultiModalProcessor,
                                                   LlavaNextProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..engine.adapters.llava_next import _fix_coords
from . import plans
from . import vllm_common as common
from .vllm_llava import VISION_MODEL_MAPPER, PlanProcessor, feature_layer, stage_values, tower_wants, with_tower_record


class TokenSieveLlavaNextProcessor(PlanProcessor, LlavaNextMultiModalProcessor):
    """vLLM's LLaVA-NeXT processor with tokensieve's plans (an image's whole packed run is one item)."""

    family = "llava_next"


def pack(model, image_size: torch.Tensor, per_tile: torch.Tensor, newline: float) -> torch.Tensor:
    """[n_tiles, P, C] values per tile of one image -> [N, C] in the order vLLM packs its features: the model's
    own ``_merge_image_patch_embeddings`` with a stand-in whose ``image_newline`` is ``newline`` in every channel
    (OneVision's takes it as an argument)."""
    line = torch.full((per_tile.shape[-1],), float(newline))
    merge = type(model)._merge_image_patch_embeddings
    kwargs = {"image_newline": line} if "image_newline" in inspect.signature(merge).parameters else {}
    return merge(SimpleNamespace(config=model.config, image_newline=line), image_size, per_tile,
                 strategy="spatial_unpad", **kwargs)


def image_coords(model, image_size: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """[N, 3] (item, row, col) of one image's packed tokens: item 0 the base tile, 1 the high-resolution grid
    (rows ending at the newline), as tokensieve's LLaVA-NeXT adapter numbers them."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    tiles = torch.stack([torch.stack([torch.full_like(r, min(t, 1)), r, c], -1).reshape(-1, 3)
                         for t in range(n_tiles)]).float()  # [n_tiles, side * side, 3]
    return _fix_coords(pack(model, image_size, tiles, -1.0))


@MULTIMODAL_REGISTRY.register_processor(TokenSieveLlavaNextProcessor, info=LlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TokenSieveLlavaNext(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT; ``embed_multimodal`` runs each image's plan on its packed features."""

    hf_to_vllm_mapper = VISION_MODEL_MAPPER | LlavaNextForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        common.announce(type(self).__name__)

    def embed_multimodal(self, **kwargs):
        field = kwargs.pop(common.FIELD, None)
        fl = feature_layer(self.config)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values" or field is None:  # image embeddings, or no plan: vLLM's path
            return self._process_image_input(image_input)
        item_plans = common.item_plans(field, len(image_input["pixel_values"]), fl)
        if all(p is None for p in item_plans):
            return self._process_image_input(image_input)
        wants = tower_wants(item_plans, fl)
        tiles, rec = with_tower_record(self, wants, lambda: self._process_image_pixels(image_input))
        sizes = image_input["image_sizes"]
        features = [self._merge_image_patch_embeddings(sizes[i], t, strategy="spatial_unpad")
                    for i, t in enumerate(tiles)]
        first = torch.tensor([0] + [t.shape[0] for t in tiles]).cumsum(0).tolist()  # each image's first tile

        def tower(i: int):
            def per_image(v: torch.Tensor) -> torch.Tensor:  # [all tiles, P(, C)] -> image i's tokens [N_i(, C)]
                t = v[first[i]:first[i + 1]].float()
                packed = pack(self, sizes[i], t[..., None] if t.dim() == 2 else t, 0.0)
                return packed[:, 0] if t.dim() == 2 else packed
            return plans.ItemTower(signals=lambda stage: {k: per_image(v) for k, v in
                                                          stage_values(rec, stage, fl).items()}) if wants else None
        return common.prune(features, item_plans, lambda i: image_coords(self, sizes[i], tiles[i].shape[0]),
                            tower=tower)

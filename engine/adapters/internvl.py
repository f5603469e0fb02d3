"""InternVL 3 / 3.5 (``InternVLForConditionalGeneration``): InternViT with a CLS token, pixel-shuffled 2 x 2
patches per LLM token, dynamic 448-px tiles plus a thumbnail; video as frames in the processor's own form.

Tiling: the processor crops an image into ``cols x rows`` tiles (the grid of closest aspect ratio,
``get_optimal_tiled_canvas``) and, when there are several, appends a thumbnail of the whole image. Each tile
is one tower pass; ``get_image_features`` drops CLS, pixel-shuffles each 2 x 2 block of patches into one token
(``pixel_shuffle``, ``downsample_ratio`` 0.5) and projects it: ``image_seq_length`` tokens per tile, in raster
order of the shuffled grid. The prompt holds ``<img>`` + the context token per tile token + ``</img>``.

The grid is not in the processor's output, so ``layout_inputs`` adds each visual item's size as
``image_sizes`` (an input InternVL's forward takes and ignores): the adapter recomputes the grid from it with
the image processor's own function and settings. Coords: item 0 is the tile grid (rows and columns counted
across tiles), item 1 the thumbnail; a one-tile image is item 0 alone.

Video (``<video>``): the processor writes ``Frame{i}: <img>...</img>`` per frame (one tile each, no thumbnail;
the ``Frame{i}:`` text is never pruned) and puts the frames into ``pixel_values`` after the request's images.

No vision-tower stages: the pixel shuffle needs every patch of a tile's grid, so a tower pruned inside
cannot be shuffled (``vision_prefix`` None: such stages are refused, suggesting where=pre_llm). The CLS
token's attention at the feature layer is recorded (``cls_tower``) and averaged over each token's four
patches in ``tower_to_tokens``, through the model's own ``pixel_shuffle``.
"""
import torch

from .base import Adapter, grid_coords, with_input_of
from .llava_onevision import CHAT_TEMPLATE  # noqa: F401 (the family's: Qwen2's turns, <image> and <video>)


class InternVLAdapter(Adapter):
    family = "internvl"
    model_types = ("internvl",)
    cls_tower = True  # InternViT's CLS token; vision_prefix stays None (no stages inside the tower)
    hooked_tower = True
    stacks_videos = True  # its processor stacks a batch's videos (pixel_values_videos [n, frames, C, H, W])

    @property
    def vision_layers(self):
        return self.model.model.vision_tower.encoder.layer

    def tower_attention_modules(self):
        return [layer.attention for layer in self.vision_layers]

    def install_hooks(self, state_kwarg: str) -> list:
        """InternViT's encoder calls its layers, and they their attention, without the call's kwargs: hooks on the
        tower hold the call's state (``state_kwarg``) while it runs, and pre-hooks on each attention module hand it
        to the attention function, which records the CLS row as on any CLS tower."""
        held = []  # the state of the tower call running now, if any
        tower = self.model.model.vision_tower

        def enter(module, args, kwargs):
            held.append(kwargs.get(state_kwarg))

        def leave(module, args, kwargs, output):
            held.pop()

        def give(module, args, kwargs):
            if held and held[-1] is not None:
                return args, {**kwargs, state_kwarg: held[-1]}
            return None

        handles = [tower.register_forward_pre_hook(enter, with_kwargs=True),
                   tower.register_forward_hook(leave, with_kwargs=True, always_call=True)]
        return handles + [m.register_forward_pre_hook(give, with_kwargs=True) for m in self.tower_attention_modules()]

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """The context token: images' tiles and video frames alike."""
        return (self.config.image_token_id,)

    @property
    def video_token(self) -> str:
        return self.processor.video_token

    # ---- layout ---------------------------------------------------------------------------------
    def layout_inputs(self, reqs) -> dict:
        """``image_sizes`` [n_items, 2] in ``pixel_values`` order (per request: its images, then its video's
        frames): an image's (height, width); a video frame's (0, its index in the video)."""
        rows = []
        for r in reqs:
            rows += [(im.height, im.width) for im in r.images]
            rows += [(0, f) for f in range(len(r.video.frames))] if r.native_video else []
        return {"image_sizes": torch.tensor(rows, dtype=torch.long).reshape(-1, 2)} if rows else {}

    @property
    def tile_side(self) -> int:
        """Tokens along one side of a tile's shuffled grid (16 for 448 px, patch 14, ratio 0.5)."""
        vc = self.config.vision_config
        return int(vc.image_size[0] // vc.patch_size[0] * self.config.downsample_ratio)

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(cols, rows) of the tiles the processor crops an image of this size into (1, 1: no cropping)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        ip = self.processor.image_processor
        crop = type(self.processor).images_kwargs.get("crop_to_patches", ip.crop_to_patches)
        if not crop or ip.max_patches <= 1:
            return 1, 1
        size = (ip.size["height"], ip.size["width"])
        return get_optimal_tiled_canvas((height, width), size, ip.min_patches, ip.max_patches)

    def _items(self, inputs) -> list[tuple[int, int, int]]:
        """Per ``pixel_values`` item: (video frame index or -1 for an image, cols, rows)."""
        out = []
        for h, w in inputs["image_sizes"].tolist():
            out.append((w, 1, 1) if h == 0 else (-1, *self.tile_grid(h, w)))
        return out

    def _tiles(self, inputs) -> tuple[list[slice], list[slice]]:
        """``pixel_values`` rows of each image and of each video (its frames), in order."""
        images, videos, start = [], [], 0
        for frame, cols, rows in self._items(inputs):
            n = cols * rows + (cols * rows > 1)  # the thumbnail after several tiles
            if frame < 0:
                images.append(slice(start, start + n))
            elif frame == 0:
                videos.append(slice(start, start + 1))
            else:
                videos[-1] = slice(videos[-1].start, start + 1)
            start += n
        if start != inputs["pixel_values"].shape[0]:  # the processor tiled with settings other than its own
            raise RuntimeError(f"InternVL layout: the image sizes give {start} tiles, the processor made "
                               f"{inputs['pixel_values'].shape[0]} (its image processor's tiling settings differ)")
        return images, videos

    def tiles_per_image(self, inputs) -> list[int]:
        return [s.stop - s.start for s in self._tiles(inputs)[0]]

    def _tower_length(self) -> int:
        """Tokens of one tile's tower pass: its patches and the CLS token."""
        vc = self.config.vision_config
        return (vc.image_size[0] // vc.patch_size[0]) * (vc.image_size[1] // vc.patch_size[1]) + 1

    def tower_sequences(self, inputs) -> list[list[int]]:
        return [[self._tower_length()] * t for t in self.tiles_per_image(inputs)]

    def image_coords(self, inputs) -> list[torch.Tensor]:
        s = self.tile_side
        out = []
        for frame, cols, rows in self._items(inputs):
            if frame >= 0:
                continue
            tiles = [grid_coords(s, s) + torch.tensor([0, (t // cols) * s, (t % cols) * s]) for t in range(cols * rows)]
            out.append(torch.cat(tiles + ([grid_coords(s, s, item=1)] if cols * rows > 1 else [])))
        return out

    # ---- vision ---------------------------------------------------------------------------------
    def _feature_kwargs(self) -> dict:
        return dict(vision_feature_layer=self.config.vision_feature_layer,
                    vision_feature_select_strategy=self.config.vision_feature_select_strategy)

    def _encode(self, pixel_values, parts: list[slice], **kwargs) -> list[torch.Tensor]:
        """The tower + shuffle + projector on the rows of ``parts`` -> one [n_tiles * T, D] per part."""
        if not parts:
            return []
        rows = torch.cat([torch.arange(p.start, p.stop) for p in parts]).to(pixel_values.device)
        out = self.model.model.get_image_features(pixel_values=pixel_values[rows], **self._feature_kwargs(), **kwargs)
        feats = out.pooler_output.flatten(0, 1)
        return list(torch.split(feats, [(p.stop - p.start) * out.pooler_output.shape[1] for p in parts]))

    def encode_images(self, inputs, **kwargs) -> list[torch.Tensor]:
        return self._encode(inputs["pixel_values"], self._tiles(inputs)[0], **kwargs)

    def encode_videos(self, inputs, **kwargs) -> list[torch.Tensor]:
        return self._encode(inputs["pixel_values"], self._tiles(inputs)[1], **kwargs)

    def encode_images_and_tower(self, inputs, **kwargs):
        """The features, and the projector's input (the shuffled feature-layer states, [N_i, 4 * D_tower]) caught
        by a forward pre-hook on this model's projector for the duration of the call."""
        feats, tower = with_input_of(self.model.model.multi_modal_projector, lambda: self.encode_images(inputs, **kwargs))
        return feats, [f.reshape(-1, f.shape[-1]) for f in torch.split(tower, self.tiles_per_image(inputs))]

    def project(self, tower_tokens: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(tower_tokens)

    def _shuffle_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-patch values [n, P, C] -> per-token [n, T, C]: the mean over the patches the model's own
        ``pixel_shuffle`` puts into each token."""
        n, p, c = values.shape
        side = int(round(p ** 0.5))
        ratio = self.config.downsample_ratio
        shuffled = self.model.model.pixel_shuffle(values.float().reshape(n, side, side, c), scale_factor=ratio)
        return shuffled.reshape(n, -1, int(round(1 / ratio)) ** 2, c).mean(2)

    def tower_to_tokens(self, values: torch.Tensor, inputs) -> list[torch.Tensor]:
        """Per-tile values [n_tiles, P, C] of the images -> per image [N_i, C] (its tiles' tokens in order)."""
        per_tile = self._shuffle_mean(values)
        return [t.reshape(-1, t.shape[-1]) for t in torch.split(per_tile, self.tiles_per_image(inputs))]

    # ---- native video -----------------------------------------------------------------------------
    def video_inputs(self, videos: list) -> dict:
        """The engine sampled the frames: the processor keeps them all (its own sampling off)."""
        import numpy as np

        return {"videos": [np.stack([np.asarray(f) for f in v.frames]) for v in videos]}

    def _frames_per_video(self, inputs) -> list[int]:
        return [s.stop - s.start for s in self._tiles(inputs)[1]]

    def video_coords(self, inputs) -> list[torch.Tensor]:
        s = self.tile_side
        return [torch.cat([grid_coords(s, s, item=f) for f in range(n)]) for n in self._frames_per_video(inputs)]

    def video_tower_to_tokens(self, values: torch.Tensor, inputs) -> list[torch.Tensor]:
        per_frame = self._shuffle_mean(values)
        return [t.reshape(-1, t.shape[-1]) for t in torch.split(per_frame, self._frames_per_video(inputs))]

    def video_tower_sequences(self, inputs) -> list[list[int]]:
        return [[self._tower_length()] * f for f in self._frames_per_video(inputs)]

    def video_token_mask(self, inputs, reqs=None) -> list[torch.Tensor]:
        """Per batch row [N_vis] bool, the tokens of a native video: the row's visual items are its images then
        its video's frames, one ``<img>`` run each, in ``pixel_values`` order."""
        ids = inputs["input_ids"]
        is_frame = [frame >= 0 for frame, _, _ in self._items(inputs)]
        out, item = [], 0
        for row in ids:
            vis = row == self.config.image_token_id
            runs = _runs(vis)
            mask = torch.zeros(int(vis.sum()), dtype=torch.bool)
            at = 0
            for length in runs:
                mask[at:at + length] = is_frame[item]
                at, item = at + length, item + 1
            out.append(mask)
        return out


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor, in order."""
    m = mask.long()
    edges = torch.diff(torch.cat([m.new_zeros(1), m, m.new_zeros(1)]))
    starts, stops = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    return (stops - starts).tolist()


# ---- the family's test, world and bench models (read by tokensieve.testing and eval/; see adapters/__init__.py) ----
# CHAT_TEMPLATE: LLaVA-OneVision's (imported above). The test tokenizer's InternVL tokens: the context token
# <image> (the placeholder), <|vision_start|> / <|vision_end|> as <img> / </img>, <video>
PLACEHOLDERS = {"image_token_id": "<image>"}  # config field -> the word-level test tokenizer's placeholder token
TOKENS = {"context_image_token": "<image>", "start_image_token": "<|vision_start|>",
          "end_image_token": "<|vision_end|>", "video_token": "<video>"}  # the processor reads these off the tokenizer
BENCH = {"model": "internvl3.5-8b", "image": (896, 448)}  # dynamic tiles: 2 x 448 px + thumbnail = 3 x 256 tokens


def internvl_tokenizer(tok):
    """``tok`` (the word-level test tokenizer) with InternVL's named tokens (``TOKENS``), saved with it."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token=tok.pad_token,
                                   unk_token=tok.unk_token, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                   padding_side=tok.padding_side, extra_special_tokens=list(tok.extra_special_tokens),
                                   model_specific_special_tokens=dict(TOKENS))


def processor(config, tok, max_patches: int = 12, **image):
    """InternVL's processor of ``config``'s geometry (the tower's tile size, ``image_seq_length`` tokens per tile,
    dynamic tiles up to ``max_patches`` (12: GotOcr2's default) plus a thumbnail) for the test tokenizer
    ``tok``; ``image``: extra image processor settings."""
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    h, w = config.vision_config.image_size
    size = {"height": h, "width": w}
    ip = GotOcr2ImageProcessorPil(size=size, crop_to_patches=True, min_patches=1, max_patches=max_patches, **image)
    return InternVLProcessor(image_processor=ip, tokenizer=internvl_tokenizer(tok),
                             video_processor=InternVLVideoProcessor(size=size), chat_template=CHAT_TEMPLATE,
                             image_seq_length=config.image_seq_length)


def tiny_model(tok):
    """(tiny random model, processor) for ``tokensieve.testing.make_tiny``: InternViT on 32 px tiles of 8 x 8
    patches + CLS (3 layers), 2 x 2 shuffled into 16 tokens per tile, Qwen2 LM (width 64, 4 layers)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096, pad_token_id=0,
                bos_token_id=2, eos_token_id=7, tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=4)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    return InternVLForConditionalGeneration(cfg), processor(cfg, tok, max_patches=6)

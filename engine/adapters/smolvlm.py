"""SmolVLM / SmolVLM2 (``smolvlm``, Idefics3-style): SigLIP tower (no CLS token), pixel shuffle, a linear connector.

Images: the processor splits an image into a grid of sub-images (crops of the tower's size) plus a global
image (the whole image resized to one crop), and writes per crop ``<fake_token_around_image><row_i_col_j>``
(the global one: ``<global-img>``) then ``image_seq_len`` ``<image>`` tokens. The tower runs every crop; the
connector's pixel shuffle turns each ``scale_factor`` x ``scale_factor`` block of patches into one token. Each
crop is an item (tile) of the image: coords are (crop, row, col) on the crop's shuffled grid, crops in the
processor's order (sub-images in raster order, then the global image). The row/column and global markers are
text tokens: never pruned.

The layout is read from the processor's own output: the model's ``get_image_features`` returns one tensor per
batch row, so the runs of ``<image>`` tokens in ``input_ids`` split it into crops, and a run that follows
``<global-img>`` ends an image.

Native video (``videos=``): the processor writes an intro line, then per frame ``\\nFrame from MM:SS:`` (its
timestamps, from the video metadata) and one global crop of ``<image>`` tokens; the model takes the frames as
image crops (``pixel_values``, the image placeholder id). Every visual token of such a request is a video token;
the timestamps are text, never pruned. The processor cannot take images and a video in one call (both
write ``pixel_values``): such requests are refused, and a batch keeps video requests apart from image ones.

No vision-tower stages: the pixel shuffle needs each crop's full square grid of patches. Tower records without
a CLS token (``tower.received``) are taken on every crop: the tower's encoder hands a call's kwargs to no layer,
so hooks of this adapter on the model instance carry the call's state from the tower's call to its layers
(``install_hooks``); per-patch values reach the LLM tokens as the mean over each token's pixel-shuffle block,
the block read from the connector's own ``pixel_shuffle``. ``tower.features`` / ``tower.patches`` are the
connector's input (the shuffled patches, one row per LLM token), caught by a forward pre-hook on its projection.
"""
import torch

from .base import Adapter, grid_coords, with_input_of


class SmolVLMAdapter(Adapter):
    family = "smolvlm"
    model_types = ("smolvlm",)
    video_with_images = False  # image and video pixels share the processor's ``pixel_values``
    hooked_tower = True  # SigLIP layers hooked (install_hooks carries the state to them): tower.received

    @property
    def llm_layers(self):
        return self.model.model.text_model.layers

    @property
    def llm_norm(self):
        return self.model.model.text_model.norm

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Images and video frames both expand into the image placeholder."""
        return (self.config.image_token_id,)

    @property
    def video_token(self) -> str:
        return self.processor.video_token

    def video_token_mask(self, inputs, reqs) -> list[torch.Tensor]:
        """A native-video request holds no images (refused): all its visual tokens are the video's."""
        vis = torch.isin(inputs["input_ids"], torch.tensor(self.visual_token_ids))
        return [torch.full((int(vis[b].sum()),), r.native_video, dtype=torch.bool) for b, r in enumerate(reqs)]

    def batch_images(self, per_request: list[list]) -> list[list]:
        """The processor pairs images with prompts per request: a nested list (one list per prompt)."""
        return [list(ims) for ims in per_request]

    # ---- the tower: its layers, and the call's state carried to them ---------------------------------
    @property
    def vision_layers(self):
        return self.model.model.vision_model.encoder.layers

    @property
    def feature_layer(self) -> int:
        """The connector takes the last layer's output (through the tower's post-layernorm)."""
        return len(self.vision_layers) - 1

    def install_hooks(self, state_kwarg: str) -> list:
        """The tower's call kwargs reach no encoder layer: a pre-hook on the tower keeps the call's state for the
        call, a pre-hook on each layer hands it on (so the engine's tower-record hooks on the attention modules see
        it), a hook after the tower drops it."""
        call = {}
        tower = self.model.model.vision_model

        def enter(module, args, kwargs):
            call["state"] = kwargs.get(state_kwarg)

        def leave(module, args, output):
            call.clear()

        def pass_on(module, args, kwargs):
            if call.get("state") is None:
                return None
            return args, {**kwargs, state_kwarg: call["state"]}

        handles = [tower.register_forward_pre_hook(enter, with_kwargs=True), tower.register_forward_hook(leave)]
        return handles + [m.register_forward_pre_hook(pass_on, with_kwargs=True, prepend=True) for m in self.vision_layers]

    def _block_mean(self, values: torch.Tensor) -> torch.Tensor:
        """[n, P, C] per-patch values of n crops -> [n, P / s^2, C]: each LLM token's mean over the s x s patches
        the connector's own pixel shuffle puts in it."""
        s = self.config.scale_factor
        n, _, c = values.shape
        shuffled = self.model.model.connector.pixel_shuffle(values.float(), s)  # [n, P / s^2, s^2 * C]
        return shuffled.reshape(n, shuffled.shape[1], s * s, c).mean(2)

    def tower_to_tokens(self, values: torch.Tensor, inputs) -> list[torch.Tensor]:
        """Per-patch values of every crop [n_crops, P, C] (rows in order) -> per image [N_i, C]."""
        per_crop = self._block_mean(values)
        return [c.flatten(0, 1) for c in torch.split(per_crop, self.tiles_per_image(inputs))]

    def video_tower_to_tokens(self, values: torch.Tensor, inputs) -> list[torch.Tensor]:
        """Per-patch values of every frame [n_frames, P, C] -> per video [N_v, C]."""
        per_frame = self._block_mean(values)
        return [f.flatten(0, 1) for f in torch.split(per_frame, [len(v) for v in self._video_rows(inputs)])]

    # ---- vision -----------------------------------------------------------------------------
    def _features(self, inputs, **kwargs) -> list[torch.Tensor]:
        """Per batch row [n_crops_b * tokens_per_crop, D]: the model's own ``get_image_features``."""
        out = self.model.model.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"), **kwargs)
        return list(out.pooler_output)

    def encode_images(self, inputs, **kwargs) -> list[torch.Tensor]:
        per_row = self._features(inputs, **kwargs)
        return [img for b, row in enumerate(per_row) for img in torch.split(row, self._image_lengths(inputs, b))]

    def encode_images_and_tower(self, inputs, **kwargs):
        """The features, and the connector's input (the pixel-shuffled patches, one row per LLM token) caught by a
        forward pre-hook on its projection for the duration of the call."""
        feats, tower = with_input_of(self.model.model.connector.modality_projection,
                                     lambda: self.encode_images(inputs, **kwargs))
        rows = tower.reshape(-1, tower.shape[-1])  # [real crops * tokens, D_tower * scale^2], row order
        lengths = [n for b in range(inputs["input_ids"].shape[0]) for n in self._image_lengths(inputs, b)]
        return feats, list(torch.split(rows, lengths))

    def project(self, tower_tokens: torch.Tensor) -> torch.Tensor:
        return self.model.model.connector.modality_projection(tower_tokens)

    def encode_videos(self, inputs, **kwargs) -> list[torch.Tensor]:
        """One [frames * tokens_per_crop, D] per video: each video request's row of crops (its frames)."""
        per_row = self._features(inputs, **kwargs)
        return [row for b, row in enumerate(per_row) if self._crops(inputs, b)]

    def _crops(self, inputs, b: int) -> list[tuple[int, bool]]:
        """Batch row b's runs of image tokens in order: (length, the run follows ``<global-img>``)."""
        ids = inputs["input_ids"][b]
        is_img = ids == self.config.image_token_id
        starts = (is_img & ~torch.cat([is_img.new_zeros(1), is_img[:-1]])).nonzero().flatten().tolist()
        ends = (is_img & ~torch.cat([is_img[1:], is_img.new_zeros(1)])).nonzero().flatten().tolist()
        glob = self.processor.tokenizer.convert_tokens_to_ids(self.processor.global_image_token)
        return [(e - s + 1, s > 0 and int(ids[s - 1]) == glob) for s, e in zip(starts, ends)]

    def _tiles(self, inputs, b: int) -> list[list[int]]:
        """Row b's images as lists of crop lengths (sub-images, then the global crop that ends each image)."""
        images, current = [], []
        for n, is_global in self._crops(inputs, b):
            current.append(n)
            if is_global:
                images.append(current)
                current = []
        if current:
            raise RuntimeError(f"batch row {b}: {len(current)} image crop(s) after the last <global-img> crop")
        return images

    def _image_lengths(self, inputs, b: int) -> list[int]:
        return [sum(t) for t in self._tiles(inputs, b)]

    def _all_tiles(self, inputs) -> list[list[int]]:
        """Every image of the batch (rows in order) as its crops' token counts."""
        return [t for b in range(inputs["input_ids"].shape[0]) for t in self._tiles(inputs, b)]

    def tiles_per_image(self, inputs) -> list[int]:
        return [len(t) for t in self._all_tiles(inputs)]

    def image_coords(self, inputs) -> list[torch.Tensor]:
        """(crop, row, col) on each crop's shuffled grid, crops numbered within their image."""
        return [_crop_coords(tiles) for tiles in self._all_tiles(inputs)]

    def tower_sequences(self, inputs) -> list[list[int]]:
        """Per image, every crop's patches (its tokens times scale_factor^2)."""
        s2 = self.config.scale_factor ** 2
        return [[n * s2 for n in tiles] for tiles in self._all_tiles(inputs)]

    # ---- native video: one global crop per frame --------------------------------------------------
    def video_inputs(self, videos: list) -> dict:
        """Frames and their metadata (the processor's timestamps); the engine sampled the frames already."""
        return dict(super().video_inputs(videos), do_sample_frames=False)

    def _video_rows(self, inputs) -> list[list[int]]:
        return [[n for n, _ in self._crops(inputs, b)] for b in range(inputs["input_ids"].shape[0])
                if self._crops(inputs, b)]

    def video_coords(self, inputs) -> list[torch.Tensor]:
        """(frame, row, col) on each frame's shuffled grid."""
        return [_crop_coords(frames) for frames in self._video_rows(inputs)]

    def video_tower_sequences(self, inputs) -> list[list[int]]:
        s2 = self.config.scale_factor ** 2
        return [[n * s2 for n in frames] for frames in self._video_rows(inputs)]


def _crop_coords(lengths: list[int]) -> torch.Tensor:
    """[sum(lengths), 3]: crop k's tokens in raster order on its square shuffled grid, item k."""
    out = []
    for k, n in enumerate(lengths):
        side = int(round(n ** 0.5))
        if side * side != n:
            raise RuntimeError(f"an image crop of {n} tokens is not a square grid")
        out.append(grid_coords(side, side, item=k))
    return torch.cat(out)


# ---- the family's test, world and bench models (read by tokensieve.testing and eval/; see adapters/__init__.py) ----
PLACEHOLDERS = {"image_token_id": "<image>",  # config field -> the word-level test tokenizer's token; the crop markers
                "fake_image_token_id": "<fake_token_around_image>",  # are tokens of SmolVLM's tokenizer (the adapter
                "global_image_token_id": "<global-img>"}  # reads <global-img>); in the config for the tests only
CHAT_TEMPLATE = (  # the test tokenizer's chat template in SmolVLM's turn format (images first, then the text)
    "<|im_start|> {% for m in messages %}{{ m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}")
BENCH = {"model": "smolvlm2-2.2b", "image": (768, 576)}  # 2 x 2 crops of 384 px + global = 5 x 81 tokens


def processor(config, tok, longest_edge: int | None = None, **image):
    """SmolVLM's processor of ``config``'s geometry for the test tokenizer ``tok``: crops of the tower's image size,
    ``image_seq_len`` = (crop / patch)^2 / scale_factor^2 tokens each; images resized to ``longest_edge`` (default
    2 crops) before splitting; video frames to one crop. ``image``: extra image-processor settings."""
    from transformers import SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    vc = config.vision_config
    crop = {"longest_edge": vc.image_size}
    ip = SmolVLMImageProcessorPil(size={"longest_edge": longest_edge or 2 * vc.image_size}, max_image_size=crop, **image)
    vp = SmolVLMVideoProcessor(size=crop, max_image_size=crop)
    seq = (vc.image_size // vc.patch_size) ** 2 // config.scale_factor ** 2
    return SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_len=seq,
                            chat_template=CHAT_TEMPLATE)


def tiny_text(tok) -> dict:
    """The tiny test models' Llama LM (width 64, 4 layers) as config fields."""
    return dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=0,
                bos_token_id=2, eos_token_id=3)


def placeholder_ids(tok) -> dict:
    """The placeholder (and crop marker) token ids of the test tokenizer ``tok``, as config fields."""
    return {field: tok.convert_tokens_to_ids(token) for field, token in PLACEHOLDERS.items()}


def tiny_model(tok):
    """(tiny random model, processor) for ``tokensieve.testing.make_tiny``: SigLIP-style tower on 32 px crops of
    8 x 8 patches, pixel shuffle 2 (16 tokens per crop), images split into up to 2 x 2 crops plus the global one."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=4)
    cfg = SmolVLMConfig(vision_config=vision, text_config=tiny_text(tok), scale_factor=2, **placeholder_ids(tok))
    return SmolVLMForConditionalGeneration(cfg), processor(cfg, tok)

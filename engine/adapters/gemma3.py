"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower (no CLS token), its patch grid average-pooled to
``mm_tokens_per_image`` tokens (4096 -> 256 on the checkpoints), an LLM whose layers alternate sliding-window
and full attention, and image tokens that attend to each other bidirectionally.

Tokens: each image (and each pan-and-scan crop, with the processor's ``do_pan_and_scan``) is one run of
``mm_tokens_per_image`` image tokens between ``<start_of_image>`` and ``<end_of_image>``; the crops are tiles
(items 1..n after the image itself, item 0), each a raster of the pooled grid. The begin / end tokens, the
newlines and pan-and-scan's text are text: never pruned.

Attention (transformers' ``create_masks_for_vision_model``): full layers ``causal OR same image``; sliding
layers ``(causal OR same image) AND k > q - sliding_window``, with q, k the cache indices of the sequence;
``same image``: one contiguous run of image tokens (``token_type_ids``). Whenever a plan runs, the engine builds
every layer's mask itself (``own_masks``) by the same rules on the tokens still alive, with

- **the sliding window measured in original positions**: q and k are the tokens' slots in the processor's
  layout (``state.seq``), the indices transformers measures the window in on the unpruned sequence. A pruned run
  is then the unpruned model with the dropped tokens masked out at and after their stage (the invariant tests'
  reference, built from transformers' own masks): pruning never lets a token see further back than it did.
  The window in positions of the pruned sequence instead would widen each layer's reach by the tokens dropped
  before it, differently at every stage and request. The sliding cache stays consistent: transformers keeps a
  sliding layer's last ``sliding_window - 1`` entries, which always hold every key within the window of the
  next token (at most ``sliding_window - 1`` alive slots lie in it); the engine's mask covers exactly the keys
  the cache returns (``visible_keys``);
- **bidirectional within one image's surviving tokens**: the image of a token is its run in the original
  layout (``attention_groups``), so pruning never joins or splits an image; decode tokens are text.

Without a plan the engine hands the model ``token_type_ids`` (``forward_inputs``) and the model builds its masks.

Pan-and-scan: the processor's class defaults turn it off at every call, so the image processor's saved settings
are passed with each call (``image_settings``); the processor drops each image's crop count from its output, so
the adapter adds it back as ``num_crops`` (``layout_inputs``; leave it out when handing ``Engine.prepare``'s
output to transformers' ``generate``). The tower: per-patch signals (``tower.received``) reach the tokens through
the projector's own average pool; there are no vision-tower stages (the grid is pooled after the tower) and no
CLS token. Video enters as frames (images): Gemma 3 has no native video input.
"""
import torch

from .base import Adapter, grid_coords

SLIDING = "sliding_attention"
PAN_AND_SCAN = ("do_pan_and_scan", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                "pan_and_scan_min_ratio_to_activate")
CROPS = "num_crops"  # the image processor's name for each image's pan-and-scan crop count


class Gemma3Adapter(Adapter):
    family = "gemma3"
    contiguous_refused = ("the engine builds its sliding-window masks on the tokens' original positions; "
                          "a contiguous numbering would need the window in the new positions, which it does not do")
    model_types = ("gemma3",)
    hooked_tower = True  # SigLIP layers hooked: CLS-free tower records (tower.received)
    own_masks = True  # every layer's mask is the engine's whenever a plan runs (sliding window, image blocks)

    @property
    def vision_layers(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def feature_layer(self) -> int:
        """The LLM features are the tower's last hidden state (after its final norm), pooled."""
        return len(self.vision_layers) - 1

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.config.image_token_id,)

    def batch_images(self, per_request: list[list]) -> list[list]:
        """Gemma 3's processor takes each prompt's images as its own list."""
        return [list(ims) for ims in per_request]

    def image_settings(self) -> dict:
        """The image processor's saved pan-and-scan settings when it has ``do_pan_and_scan`` on (the processor's
        class defaults, pan-and-scan off, would override them), else none."""
        ip = self.processor.image_processor
        if not getattr(ip, "do_pan_and_scan", None):
            return {}
        return {k: getattr(ip, k) for k in PAN_AND_SCAN if getattr(ip, k, None) is not None}

    def layout_inputs(self, reqs) -> dict:
        """``num_crops`` [n_images] with pan-and-scan on (the processor computes it, then drops it from its output):
        the image processor's own count for each image, in the processor's image order."""
        settings = self.image_settings()
        images = [im for r in reqs for im in r.images]
        if not settings or not images:
            return {}
        defaults = getattr(self.processor, "images_kwargs", {})  # the processor's own, for the settings not saved
        settings = {**{k: defaults[k] for k in PAN_AND_SCAN if k in defaults}, **settings}
        return {CROPS: torch.as_tensor(self.processor.image_processor(images, **settings)["num_crops"]).flatten()}

    # ---- vision --------------------------------------------------------------------------------
    def encode_images(self, inputs, **kwargs) -> list[torch.Tensor]:
        """[n_tiles, T, D] pooled, projected features -> per image [tiles_i * T, D] (the image, then its crops)."""
        out = self.model.model.get_image_features(inputs["pixel_values"], **kwargs)
        return [t.reshape(-1, t.shape[-1]) for t in torch.split(out.pooler_output, self.tiles_per_image(inputs))]

    def tiles_per_image(self, inputs) -> list[int]:
        """1 + the image's pan-and-scan crops."""
        crops = inputs.get(CROPS)
        if crops is None:
            return [1] * inputs["pixel_values"].shape[0]
        return [1 + int(n) for n in torch.as_tensor(crops).flatten().tolist()]

    def _sides(self) -> tuple[int, int]:
        """(patches per side of a tile, pooled tokens per side), as the model's projector computes them."""
        proj = self.model.model.multi_modal_projector
        return proj.patches_per_image, proj.patches_per_image // proj.kernel_size

    def image_coords(self, inputs) -> list[torch.Tensor]:
        """Per image [tiles * T, 3]: tile t (0 the image, 1.. its crops), row, col on the pooled grid."""
        _, side = self._sides()
        return [torch.cat([grid_coords(side, side, item=t) for t in range(n)]) for n in self.tiles_per_image(inputs)]

    def vision_patch_coords(self, inputs) -> list[torch.Tensor]:
        patches, _ = self._sides()
        return [torch.cat([grid_coords(patches, patches, item=t) for t in range(n)])
                for n in self.tiles_per_image(inputs)]

    def tower_sequences(self, inputs) -> list[list[int]]:
        patches, _ = self._sides()
        return [[patches * patches] * n for n in self.tiles_per_image(inputs)]

    def tower_to_tokens(self, values: torch.Tensor, inputs) -> list[torch.Tensor]:
        """Per-patch values [n_tiles, P, C] -> per image [tiles * T, C]: each token gets the mean over the patches
        the model's own average pool puts into it (its ``avg_pool``, on the values instead of the features)."""
        patches, side = self._sides()
        grid = values.float().transpose(1, 2).reshape(values.shape[0], values.shape[-1], patches, patches)
        pooled = self.model.model.multi_modal_projector.avg_pool(grid).flatten(2).transpose(1, 2)  # [n, T, C]
        return [t.reshape(-1, t.shape[-1]) for t in torch.split(pooled, self.tiles_per_image(inputs))]

    # ---- attention -----------------------------------------------------------------------------
    def forward_inputs(self, inputs) -> dict:
        """The model's own image blocks: ``token_type_ids`` [B, L] (1 at image tokens)."""
        return {"token_type_ids": inputs["token_type_ids"]}

    def attention_groups(self, inputs) -> torch.Tensor:
        """[B, L]: per slot of the processor's layout, the index of its image's run of tokens, -1 for text."""
        is_image = inputs["input_ids"] == self.config.image_token_id
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        return torch.where(is_image, starts.long().cumsum(1) - 1, -1)

    def mask_kind(self, layer: int) -> str:
        return self.text_config.layer_types[layer]

    def allowed(self, kind: str, q_seq, k_seq, q_group, k_group) -> torch.Tensor:
        """[B, Sq, Sk] by transformers' rules on original slots: causal or the same image; sliding layers also
        ``k > q - sliding_window``."""
        rule = (k_seq[:, None, :] <= q_seq[:, :, None]) | ((q_group[:, :, None] == k_group[:, None, :])
                                                           & (q_group[:, :, None] >= 0))
        if kind == SLIDING:
            rule &= k_seq[:, None, :] > q_seq[:, :, None] - self.text_config.sliding_window
        return rule

    def visible_keys(self, kind: str, n_cached: int, n_new: int) -> int:
        """Keys a layer's cache returns: a sliding layer keeps its last ``sliding_window - 1`` entries."""
        if kind == SLIDING:
            return min(n_cached, self.text_config.sliding_window - 1) + n_new
        return n_cached + n_new


# ---- the family's test, world and bench models (read by tokensieve.testing and eval/; see adapters/__init__.py) ----
# the test tokenizer's tokens stand for Gemma 3's <image_soft_token>, <start_of_image> (the prompt's image
# placeholder, which the processor expands) and <end_of_image>
PLACEHOLDERS = {"image_token_id": "<image>", "boi_token_id": "<|vision_start|>", "eoi_token_id": "<|vision_end|>"}
CHAT_TEMPLATE = (  # the test tokenizer's chat template in Gemma's turn format (its <start_of_turn> / <end_of_turn>
    # stood for by the test tokenizer's turn tokens; images first, then the text)
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
BENCH = {"model": "gemma-3-12b", "image": (896, 896)}  # eval/bench/configs/gemma-3-12b.json; 256 pooled tokens


def gemma_tokenizer(tok):
    """The test tokenizer ``tok`` with Gemma 3's named image tokens (``image_token``, ``boi_token``,
    ``eoi_token``: what its processor reads), as transformers' ``model_specific_special_tokens``."""
    from transformers import PreTrainedTokenizerFast

    named = {"image_token": PLACEHOLDERS["image_token_id"], "boi_token": PLACEHOLDERS["boi_token_id"],
             "eoi_token": PLACEHOLDERS["eoi_token_id"]}
    return PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token=tok.pad_token,
                                   unk_token=tok.unk_token, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                   padding_side=tok.padding_side, model_specific_special_tokens=named)


def processor(config, tok, **image):
    """Gemma 3's processor of ``config``'s geometry (the tower's square image, the pooled token count) for the
    test tokenizer ``tok``; ``image``: extra image-processor settings (``do_pan_and_scan`` and its sizes)."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    vc = config.vision_config
    side = int(config.mm_tokens_per_image ** 0.5)  # the projector pools to side x side tokens
    ip = Gemma3ImageProcessorPil(size={"height": vc.image_size, "width": vc.image_size}, **image)
    return Gemma3Processor(image_processor=ip, tokenizer=gemma_tokenizer(tok), chat_template=CHAT_TEMPLATE,
                           image_seq_length=side * side)


def tiny_text(tok) -> dict:
    """The tiny test models' Gemma 3 LM: width 64, 4 layers (sliding, full, sliding, full), window 16."""
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, vocab_size=len(tok),
                max_position_embeddings=2048, sliding_window=16, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                layer_types=[SLIDING, "full_attention", SLIDING, "full_attention"],
                tie_word_embeddings=False)  # make_tiny re-draws the output embeddings: not the input ones too


def tiny_vision() -> dict:
    """The tiny SigLIP tower: 48 px, patch 4 (12 x 12 patches), 3 layers."""
    return dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, image_size=48, patch_size=4)


def placeholder_ids(tok) -> dict:
    return {field: tok.convert_tokens_to_ids(token) for field, token in PLACEHOLDERS.items()}


def tiny_model(tok):
    """(tiny random model, processor) for ``tokensieve.testing.make_tiny``: 48 px images, 12 x 12 patches pooled
    to 6 x 6 = 36 tokens; a prompt with an image crosses the 16-token sliding window."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(text_config=tiny_text(tok), vision_config=tiny_vision(), mm_tokens_per_image=36,
                       tie_word_embeddings=False, **placeholder_ids(tok))
    return Gemma3ForConditionalGeneration(cfg), processor(cfg, tok)

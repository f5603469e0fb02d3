"""Qwen2.5-VL: as Qwen2-VL on the LLM side (M-RoPE, 2x2 merger); the tower uses windowed attention."""
from .qwen2_vl import CHAT_TEMPLATE, PIXELS, PLACEHOLDERS  # noqa: F401 (the family's, as Qwen2-VL's)
from .qwen2_vl import Qwen2VLAdapter, placeholder_ids, qwen_processor, tiny_text, tiny_vision


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def _rope_kwargs(self, inputs) -> dict:
        """Video temporal positions step by ``tokens_per_second * second_per_grid_ts`` (from the sampled fps)."""
        return {"second_per_grid_ts": inputs.get("second_per_grid_ts")}


# ---- the family's test, world and bench models (read by tokensieve.testing and eval/; see adapters/__init__.py) ----
# PLACEHOLDERS and CHAT_TEMPLATE: Qwen2-VL's (imported above)
BENCH = {"model": "qwen2.5-vl-7b", "image": (672, 672)}  # eval/bench/configs/qwen2.5-vl-7b.json; 576 tokens merged


def processor(config, tok, pixels: tuple[int, int] = PIXELS, **image):
    """Qwen2.5-VL's processor of ``config``'s geometry (``qwen_processor``)."""
    return qwen_processor("Qwen2_5_VLProcessor", config, tok, pixels, **image)


def tiny_model(tok):
    """(tiny random model, processor) for ``tokensieve.testing.make_tiny``: as Qwen2-VL's, windowed tower blocks."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(tiny_vision(), out_hidden_size=64, intermediate_size=64, window_size=16, fullatt_block_indexes=[1])
    vision.pop("embed_dim")
    cfg = Qwen2_5_VLConfig(text_config=tiny_text(tok), vision_config=vision, **placeholder_ids(tok))
    return Qwen2_5_VLForConditionalGeneration(cfg), processor(cfg, tok, pixels=(16 * 16, 64 * 64))

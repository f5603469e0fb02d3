"""Qwen2.5-VL: as Qwen2-VL on the LLM side (M-RoPE, 2x2 merger); the tower uses windowed attention."""
from .qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def _rope_kwargs(self, inputs) -> dict:
        """Video temporal positions step by ``tokens_per_second * second_per_grid_ts`` (from the sampled fps)."""
        return {"second_per_grid_ts": inputs.get("second_per_grid_ts")}

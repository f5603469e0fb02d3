"""Qwen2-VL: no CLS token, 2x2 patch merger, 3-D M-RoPE positions from ``get_rope_index``."""
import torch

from .base import Adapter, grid_coords


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)

    @property
    def video_token(self) -> str:
        return self.processor.video_token

    def encode_images(self, inputs, **kwargs) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], **kwargs)
        return list(out.pooler_output)

    def video_inputs(self, videos: list) -> dict:
        """As qwen-vl-utils: the per-frame pixel cap on (transformers' video processor asks which to use)."""
        kwargs = super().video_inputs(videos)
        if hasattr(type(self.processor.video_processor), "cap_pixels_per_frame"):
            kwargs["cap_pixels_per_frame"] = True
        return kwargs

    def encode_videos(self, inputs) -> list[torch.Tensor]:
        out = self.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        return list(out.pooler_output)

    def image_coords(self, inputs) -> list[torch.Tensor]:
        return self._grid_coords(inputs["image_grid_thw"])

    def video_coords(self, inputs) -> list[torch.Tensor]:
        """(t, row, col) on the merged grid: LLM video token k of a video is temporal patch t (frames 2t, 2t+1)."""
        return self._grid_coords(inputs["video_grid_thw"])

    def _grid_coords(self, grid_thw) -> list[torch.Tensor]:
        m = self.config.vision_config.spatial_merge_size
        return [torch.cat([grid_coords(int(h) // m, int(w) // m, item=f) for f in range(int(t))])
                for t, h, w in grid_thw.tolist()]

    def position_ids(self, inputs) -> torch.Tensor:
        """[4, B, L]: text positions (row 0, used for masks) and the three M-RoPE axes, as ``generate`` does."""
        text = super().position_ids(inputs)
        rope, _ = self.model.model.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs["attention_mask"], mm_token_type_ids=inputs.get("mm_token_type_ids"),
            **self._rope_kwargs(inputs))
        return torch.cat([text[None], rope], dim=0)

    def _rope_kwargs(self, inputs) -> dict:
        return {}

    def tower_sequences(self, inputs) -> list[list[int]]:
        return [[int(t) * int(h) * int(w)] for t, h, w in inputs["image_grid_thw"].tolist()]

    def video_tower_sequences(self, inputs) -> list[list[int]]:
        return [[int(t) * int(h) * int(w)] for t, h, w in inputs["video_grid_thw"].tolist()]

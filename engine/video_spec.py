"""A ``video=`` as given: its forms and options checked (``VideoSpec``), and qwen-vl-utils 0.0.14's
frame sampling (``sample_indices``: smart_nframes + calculate_video_frame_range), pure functions.
``engine/video.py`` decodes what these choose."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from .errors import InputError

FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
FRAMES_FPS = 2.0  # the rate of given frames without "video_fps" (qwen-vl-utils' sample_fps of frame lists)
ARRAY_FORM = "[T, H, W, 3] uint8 (numpy array or torch tensor)"
FPS_OPTIONS = ("fps", "min_frames", "max_frames", "start", "end")


def round_by_factor(x: float, factor: int = FRAME_FACTOR) -> int:
    return round(x / factor) * factor


def ceil_by_factor(x: float, factor: int = FRAME_FACTOR) -> int:
    return math.ceil(x / factor) * factor


def floor_by_factor(x: float, factor: int = FRAME_FACTOR) -> int:
    return math.floor(x / factor) * factor


# ---- the spec ---------------------------------------------------------------------------------
@dataclass
class VideoSpec:
    """A checked ``video=``: a file ``path`` or ``frames`` (list, or [T, H, W, 3] uint8 array), plus options."""

    path: str | None = None
    frames: Any = None
    nframes: int | None = None
    fps: float | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    start: float | None = None
    end: float | None = None
    video_fps: float | None = None

    @classmethod
    def parse(cls, video) -> "VideoSpec":
        if isinstance(video, VideoSpec):
            return video
        if isinstance(video, dict):
            keys = [f.name for f in fields(cls)]
            unknown = [k for k in video if k not in keys]
            if unknown:
                raise InputError(f"video: unknown key(s) {sorted(map(str, unknown))}; accepted: {keys}")
            if ("path" in video) == ("frames" in video):
                raise InputError("video: a dict needs exactly one of 'path' (a file) or 'frames'")
            spec = cls(**video)
        elif isinstance(video, (str, os.PathLike)):
            spec = cls(path=video)
        elif isinstance(video, (list, tuple)) or is_array(video):
            spec = cls(frames=video)
        else:
            raise InputError(f"video: expected a file path, a list of frames, a {ARRAY_FORM} or a dict, "
                             f"got {type(video).__name__}")
        spec._check()
        return spec

    def _check(self) -> None:
        for name in ("nframes", "min_frames", "max_frames"):
            setattr(self, name, positive_int(name, getattr(self, name)))
        for name, zero_ok in (("fps", False), ("video_fps", False), ("start", True), ("end", False)):
            setattr(self, name, _finite(name, getattr(self, name), zero_ok))
        if self.nframes is not None and self.fps is not None:
            raise InputError("video: nframes and fps are mutually exclusive; give one")
        if self.nframes is not None and (self.min_frames or self.max_frames):
            raise InputError("video: min_frames / max_frames apply to fps sampling, not with nframes")
        if self.min_frames and self.max_frames and self.min_frames > self.max_frames:
            raise InputError(f"video: min_frames ({self.min_frames}) exceeds max_frames ({self.max_frames})")
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise InputError(f"video: start ({self.start:g} s) must be before end ({self.end:g} s)")
        if self.path is not None:
            if self.video_fps is not None:
                raise InputError("video: video_fps applies to frames only; a file's frame rate is read from it")
            if not isinstance(self.path, (str, os.PathLike)):
                raise InputError(f"video: 'path' must be a file path, got {type(self.path).__name__}")
            self.path = os.fspath(self.path).removeprefix("file://")
            if not os.path.isfile(self.path):
                raise InputError(f"video: file not found: {self.path}")
            if os.path.getsize(self.path) == 0:
                raise InputError(f"video: {self.path} is empty (0 bytes)")
        elif self.video_fps is None and any(getattr(self, k) is not None for k in FPS_OPTIONS):
            raise InputError("video: fps / min_frames / max_frames / start / end on frames need 'video_fps' "
                             "(the rate the frames were taken at)")
        elif is_array(self.frames):
            self.frames = _as_video_array(self.frames)
        elif not isinstance(self.frames, (list, tuple)) or not self.frames:
            raise InputError(f"video: 'frames' must be a non-empty list of frames or a {ARRAY_FORM}")


def positive_int(name: str, v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise InputError(f"video: {name} must be a positive int, got {v!r}")
    return int(v)


def _finite(name: str, v, zero_ok: bool):
    if v is None:
        return None
    if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
            or v < 0 or (v == 0 and not zero_ok)):
        unit = " (seconds)" if name in ("start", "end") else ""
        raise InputError(f"video: {name} must be a {'non-negative' if zero_ok else 'positive'} finite number"
                         f"{unit}, got {v!r}")
    return float(v)


def is_array(x) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def _as_video_array(x) -> np.ndarray:
    """[T, H, W, 3] uint8 numpy view of a numpy array or torch tensor; InputError naming the accepted form."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InputError(f"video: array of shape {list(arr.shape)} and dtype {arr.dtype}; expected {ARRAY_FORM}")
    if arr.shape[0] == 0:
        raise InputError("video: array has no frames (T = 0)")
    return arr


# ---- sampling (pure) --------------------------------------------------------------------------
def frame_range(total_frames: int, video_fps: float, start: float | None = None,
                end: float | None = None) -> tuple[int, int]:
    """(first, last) source frame covered by start / end seconds (qwen-vl-utils' calculate_video_frame_range)."""
    if total_frames < 1:
        raise InputError("video: has no frames")
    if start is None and end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    if start is not None and start >= duration:
        raise InputError(f"video: start={start:g} s is beyond the video's duration ({duration:g} s)")
    first = math.ceil(max(0.0, start) * video_fps) if start is not None else 0
    last = total_frames - 1 if end is None else min(math.floor(min(end, duration) * video_fps), total_frames - 1)
    if first >= last:
        raise InputError(f"video: start..end ({start}..{end} s) covers fewer than 2 frames at {video_fps:g} fps")
    return first, last


def sample_indices(total_frames: int, video_fps: float, nframes: int | None = None, fps: float | None = None,
                   min_frames: int | None = None, max_frames: int | None = None, start: float | None = None,
                   end: float | None = None) -> list[int]:
    """The n source frame indices to sample (ascending) by qwen-vl-utils 0.0.14's smart_nframes."""
    if nframes is not None and fps is not None:
        raise InputError("video: nframes and fps are mutually exclusive; give one")
    first, last = frame_range(total_frames, video_fps, start, end)
    count = last - first + 1
    if nframes is not None:
        n = round_by_factor(nframes)
    else:
        lo = ceil_by_factor(min_frames or FPS_MIN_FRAMES)
        hi = floor_by_factor(min(max_frames or FPS_MAX_FRAMES, count))
        n = floor_by_factor(min(min(max(count / video_fps * (fps or FPS), lo), hi), count))
    if count < FRAME_FACTOR:
        raise InputError(f"video: has only {count} frame in range; sampling needs at least {FRAME_FACTOR}")
    if not FRAME_FACTOR <= n <= count:
        asked = f"nframes={nframes}" if nframes is not None else f"max_frames={max_frames}"
        raise InputError(f"video: {asked} gives {n} frames (a multiple of 2); it must give 2..{count}, "
                         "the frames in range")
    return torch.linspace(first, last, n, dtype=torch.float32).round().long().tolist()


def plan_indices(spec: VideoSpec, total: int, rate: float, default_nframes: int | None) -> tuple[list[int], float]:
    """(indices, sampled fps = n / frames in range * rate) for a spec, with the caller's default."""
    first, last = frame_range(total, rate, spec.start, spec.end)
    nframes = spec.nframes
    if nframes is None and spec.fps is None and not spec.min_frames and not spec.max_frames and default_nframes:
        nframes = max(FRAME_FACTOR, floor_by_factor(min(default_nframes, last - first + 1)))
    idx = sample_indices(total, rate, nframes, spec.fps, spec.min_frames, spec.max_frames, spec.start, spec.end)
    return idx, len(idx) / max(last - first + 1, 1e-6) * rate

"""Video input: parse a ``video=``, sample frames the qwen-vl-utils way, decode only the sampled frames.

``video=``: a path (any container PyAV opens: mp4, webm, mkv, avi, mov; ``file://`` allowed); frames (a
list/tuple of image paths, PIL images or [H, W, 3] uint8 arrays, one size); a [T, H, W, 3] uint8 numpy
array or torch tensor; or a dict {"path" | "frames", "nframes" | "fps", "min_frames", "max_frames",
"start", "end" (seconds), "video_fps" (frames only)}.

Sampling (``sample_indices``) is qwen-vl-utils 0.0.14's smart_nframes + calculate_video_frame_range. A file
whose spec names none of nframes / fps / min_frames / max_frames takes ``default_nframes`` frames when the
caller gives one (clamped to the frames in range, floored to even), else fps 2. Given frames: no option ->
every frame (no default); nframes -> sampled like a file; fps / min_frames / max_frames / start / end need
"video_fps". Their times are index / video_fps (2.0 when not given, qwen-vl-utils' frame-list rate).

Files: only the sampled frames are decoded (seek to the keyframe at or before a target, decode forward;
a target less than a GOP ahead is reached by decoding on), one decoded frame held at a time: memory does
not grow with the video's length. A file that ends before its header says is re-sampled over the frames
it has (``truncated=True``, ``frames_usable``).
"""
from __future__ import annotations

import math
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from PIL import Image

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
        elif isinstance(video, (list, tuple)) or _is_array(video):
            spec = cls(frames=video)
        else:
            raise InputError(f"video: expected a file path, a list of frames, a {ARRAY_FORM} or a dict, "
                             f"got {type(video).__name__}")
        spec._check()
        return spec

    def _check(self) -> None:
        for name in ("nframes", "min_frames", "max_frames"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
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
        elif _is_array(self.frames):
            self.frames = _as_video_array(self.frames)
        elif not isinstance(self.frames, (list, tuple)) or not self.frames:
            raise InputError(f"video: 'frames' must be a non-empty list of frames or a {ARRAY_FORM}")


def _positive_int(name: str, v):
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


def _is_array(x) -> bool:
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


def _sampling(spec: VideoSpec, total: int, rate: float, default_nframes: int | None) -> tuple[list[int], float]:
    """(indices, sampled fps = n / frames in range * rate) for a spec, with the caller's default."""
    first, last = frame_range(total, rate, spec.start, spec.end)
    nframes = spec.nframes
    if nframes is None and spec.fps is None and not spec.min_frames and not spec.max_frames and default_nframes:
        nframes = max(FRAME_FACTOR, floor_by_factor(min(default_nframes, last - first + 1)))
    idx = sample_indices(total, rate, nframes, spec.fps, spec.min_frames, spec.max_frames, spec.start, spec.end)
    return idx, len(idx) / max(last - first + 1, 1e-6) * rate


# ---- the result -------------------------------------------------------------------------------
@dataclass
class DecodedVideo:
    """A video's sampled frames.

    frames: n RGB PIL images of one size (empty from ``probe_video``); indices: n source frame numbers
    (ascending); times: n seconds (a file's frame pts from the stream start; given frames: index /
    video_fps); video_fps: the source rate (given frames: "video_fps" or 2.0); total_frames: frames the
    source has (a truncated file: those usable); sampled_fps: n / frames in the start..end range * video_fps
    (qwen-vl-utils' sample_fps); truncated: the file ended before its header said; frames_usable: frames
    decodable (== total_frames unless truncated; a probe trusts the header); source: the path, or a description.
    """

    frames: list
    indices: list[int]
    times: list[float]
    video_fps: float
    total_frames: int
    sampled_fps: float
    truncated: bool = False
    source: str = ""
    frames_usable: int = 0


def decode_video(video, default_nframes: int | None = None) -> DecodedVideo:
    """Parse, check and decode a ``video=`` (see the module docstring). Raises InputError."""
    return _load(video, default_nframes, probe=False)


def probe_video(video, default_nframes: int | None = None) -> DecodedVideo:
    """``decode_video`` without the decoding (a file's first frame only, to know it is readable): ``frames``
    is empty, the indices are planned from the header (truncation is found out by ``decode_video``)."""
    return _load(video, default_nframes, probe=True)


def _load(video, default_nframes: int | None, probe: bool) -> DecodedVideo:
    spec, default_nframes = VideoSpec.parse(video), _positive_int("default_nframes", default_nframes)
    return _load_file(spec, default_nframes, probe) if spec.path is not None else _load_frames(spec, probe)


# ---- given frames -----------------------------------------------------------------------------
def _load_frames(spec: VideoSpec, probe: bool) -> DecodedVideo:
    rate = spec.video_fps or FRAMES_FPS
    if isinstance(spec.frames, np.ndarray):
        arr = spec.frames
        total, source = len(arr), f"array{list(arr.shape)}"
        get = lambda i: Image.fromarray(np.ascontiguousarray(arr[i]))  # noqa: E731
    else:
        items = list(spec.frames)
        _check_sizes([_frame_size(f, i) for i, f in enumerate(items)])
        total, source = len(items), f"{len(items)} frames"
        get = lambda i: _frame_image(items[i], i)  # noqa: E731
    if spec.nframes is None and all(getattr(spec, k) is None for k in FPS_OPTIONS):
        idx, sampled = list(range(total)), rate
    else:
        idx, sampled = _sampling(spec, total, rate, None)
    return DecodedVideo(frames=[] if probe else [get(i) for i in idx], indices=idx, times=[i / rate for i in idx],
                        video_fps=rate, total_frames=total, sampled_fps=sampled, source=source, frames_usable=total)


def _frame_size(item, i: int) -> tuple[int, int]:
    """(width, height) of one given frame, reading only a file's header."""
    if isinstance(item, Image.Image):
        return item.size
    if isinstance(item, (str, os.PathLike)):
        with _open_image(item, i) as im:
            return im.size
    if _is_array(item):
        shape = tuple(item.shape)
        if len(shape) != 3 or shape[-1] != 3 or item.dtype not in (np.uint8, torch.uint8):
            raise InputError(f"video frame {i}: array of shape {list(shape)} and dtype {item.dtype}; "
                             "expected [H, W, 3] uint8")
        return shape[1], shape[0]
    raise InputError(f"video frame {i}: expected an image path, a PIL image or an [H, W, 3] uint8 array, "
                     f"got {type(item).__name__}")


def _check_sizes(sizes: list[tuple[int, int]]) -> None:
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            raise InputError(f"video: frame {i} is {size[0]}x{size[1]} but frame 0 is {sizes[0][0]}x{sizes[0][1]} "
                             "(width x height); all frames of a video must have one size")


def _open_image(path, i: int) -> Image.Image:
    if not os.path.isfile(path):
        raise InputError(f"video frame {i}: file not found: {path}")
    try:
        return Image.open(path)
    except Exception as e:  # PIL raises several types for unreadable files
        raise InputError(f"video frame {i}: cannot read image {path}: {e}") from None


def _frame_image(item, i: int) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if _is_array(item):
        arr = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else item
        return Image.fromarray(np.ascontiguousarray(arr))
    with _open_image(item, i) as im:
        return im.convert("RGB")


# ---- files ------------------------------------------------------------------------------------
def _import_av():
    try:
        import av
    except ImportError:
        raise InputError("video: reading video files needs PyAV: pip install 'tokensieve[video]'") from None
    return av


@dataclass(frozen=True)
class _Stream:
    """What a file's header says: frame rate, time base, first pts, frame count (may lie: truncation)."""

    rate: Fraction
    time_base: Fraction
    start_pts: int
    total: int

    def pts_of(self, i: int) -> int:
        return self.start_pts + round(i / (self.rate * self.time_base))

    def index_of(self, pts: int) -> int:
        return round((pts - self.start_pts) * self.time_base * self.rate)


def _stream_info(av, container, stream, path: str) -> _Stream:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0 or not stream.time_base:
        raise InputError(f"video: {path} has no frame rate")
    total = stream.frames or 0
    if total <= 0:  # mkv / webm: no frame count in the header; estimate from the duration
        seconds = (stream.duration * stream.time_base if stream.duration
                   else (container.duration or 0) / av.time_base)
        total = round(float(seconds) * float(rate))
    if total <= 0:  # no duration either: count the packets (no decoding)
        total = sum(1 for p in container.demux(stream) if p.size)
        container.seek(0)
    if total <= 0:
        raise InputError(f"video: {path} has no video frames")
    return _Stream(Fraction(rate), Fraction(stream.time_base), stream.start_time or 0, total)


class _Cursor:
    """Forward decoding of one stream that seeks (to the keyframe at or before the target) only when the
    target lies more than a GOP ahead; the GOP length is learnt from where seeks land and keyframes seen.
    A seek that lands past its target or on a non-keyframe (no index: a truncated avi) ends seeking: the
    stream is then decoded from its start, forward only."""

    def __init__(self, container, stream, info: _Stream):
        self.container, self.stream, self.info = container, stream, info
        self.frames, self.frame, self.pos, self.gop, self.key = None, None, -1, 0, None

    def frame_at(self, target: int):
        """The first frame with index >= target (an av.VideoFrame), or None past the end of the data."""
        if self.frame is not None and self.pos >= target:
            return self.frame
        if self.frames is None or target - self.pos > self.gop:
            self._seek(target)
        while (frame := self._next()) is not None:
            idx = self.pos + 1 if frame.pts is None else self.info.index_of(frame.pts)
            if self.frame is None and self.gop < math.inf:  # the first frame after a seek: where it landed
                if idx > target or not frame.key_frame:  # seeking is unreliable here: decode on from the start
                    self.gop = math.inf
                    self._seek(0)
                    continue
                self.gop = max(self.gop, target - idx)
            if frame.key_frame:
                self.gop = max(self.gop, idx - self.key) if self.key is not None else self.gop
                self.key = idx
            self.frame, self.pos = frame, idx
            if idx >= target:
                return frame
        return None

    def _seek(self, target: int) -> None:
        self.frame, self.pos, self.key = None, -1, None
        pts = self.info.start_pts if self.gop == math.inf else self.info.pts_of(target)
        try:
            self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)
            self.frames = self.container.decode(self.stream)
        except Exception:  # a seek into missing data (truncated file): nothing more to decode
            self.frames = iter(())

    def _next(self):
        try:
            return next(self.frames, None)
        except Exception:  # broken data ends the stream: decoded as far as it goes
            self.frames = iter(())
            return None

    def usable(self, known: int) -> int:
        """Frames decodable, decoding from frame ``known`` (decodable) to the end of the data."""
        self._seek(known)
        last = -1
        while (frame := self._next()) is not None:
            last = last + 1 if frame.pts is None else self.info.index_of(frame.pts)
        return last + 1


def _read(cursor: _Cursor, targets: list[int]) -> tuple[list[Image.Image], list[float], int | None]:
    """(frames, times) of the targets reached; the frames usable if the data ended first, else None."""
    frames, times, size = [], [], None
    for t in targets:
        frame = cursor.frame_at(t)
        if frame is None:
            return frames, times, cursor.usable(targets[len(frames) - 1] if frames else 0)
        rgb = frame.to_ndarray(format="rgb24", **({} if size is None else dict(width=size[0], height=size[1])))
        frames.append(Image.fromarray(rgb))
        size = frames[0].size
        info = cursor.info
        times.append(float((frame.pts - info.start_pts) * info.time_base) if frame.pts is not None
                     else t / float(info.rate))
    return frames, times, None


def _load_file(spec: VideoSpec, default_nframes: int | None, probe: bool) -> DecodedVideo:
    av = _import_av()
    try:
        container = av.open(spec.path)
    except Exception as e:
        raise InputError(f"video: cannot read {spec.path} as a video: {e}") from None
    with container:
        if not container.streams.video:
            raise InputError(f"video: {spec.path} has no video stream")
        stream = container.streams.video[0]
        info = _stream_info(av, container, stream, spec.path)
        rate = float(info.rate)
        idx, sampled = _sampling(spec, info.total, rate, default_nframes)
        cursor = _Cursor(container, stream, info)
        if probe:
            if cursor.frame_at(0) is None:
                raise InputError(f"video: {spec.path} has no decodable frames")
            return DecodedVideo([], idx, [i / rate for i in idx], rate, info.total, sampled,
                                source=spec.path, frames_usable=info.total)
        frames, times, usable = _read(cursor, idx)
        total = info.total if usable is None else usable
        if usable is not None and usable > 0:  # truncated: sample again over the frames there are
            try:
                idx, sampled = _sampling(spec, usable, rate, default_nframes)
                frames, times, _ = _read(_Cursor(container, stream, info), idx)
            except InputError:  # too few frames left for the options: keep those reached
                sampled = len(frames) / max(usable, 1e-6) * rate
            idx = idx[:len(frames)]
    if not frames:
        raise InputError(f"video: {spec.path} has no decodable frames")
    return DecodedVideo(frames, idx, times, rate, total, sampled, truncated=usable is not None,
                        source=spec.path, frames_usable=total)


# ---- background decoding ----------------------------------------------------------------------
class VideoPrefetcher:
    """Decode the next items' videos in a thread pool while the caller works (PyAV releases the GIL).

    ``with VideoPrefetcher() as pool: pool.submit(key, video, 8); ...; pool.result(key)`` -> DecodedVideo,
    or that item's InputError raised. Leaving the block cancels what has not started and waits for the rest.
    """

    def __init__(self, max_workers: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tokensieve-video")
        self._pending: dict = {}

    def submit(self, key, video, default_nframes: int | None = None) -> None:
        self._pending[key] = self._pool.submit(decode_video, video, default_nframes)

    def result(self, key) -> DecodedVideo:
        if key not in self._pending:
            raise KeyError(f"no video was submitted under key {key!r}")
        return self._pending.pop(key).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> "VideoPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

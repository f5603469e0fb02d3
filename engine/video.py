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
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .video_spec import FPS_OPTIONS, FRAMES_FPS, VideoSpec, is_array, positive_int, plan_indices


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
    frames_usable: int = 0  # 0: all of total_frames

    def __post_init__(self):
        self.frames_usable = self.frames_usable or self.total_frames


def decode_video(video, default_nframes: int | None = None) -> DecodedVideo:
    """Parse, check and decode a ``video=`` (see the module docstring). Raises InputError."""
    return _load(video, default_nframes, probe=False)


def probe_video(video, default_nframes: int | None = None) -> DecodedVideo:
    """``decode_video`` without the decoding (a file's first frame only, to know it is readable): ``frames``
    is empty, the indices are planned from the header (truncation is found out by ``decode_video``)."""
    return _load(video, default_nframes, probe=True)


def _load(video, default_nframes: int | None, probe: bool) -> DecodedVideo:
    if isinstance(video, DecodedVideo):  # decoded once already (e.g. the CLI, shared by every plan)
        return video
    spec, default_nframes = VideoSpec.parse(video), positive_int("default_nframes", default_nframes)
    return _load_file(spec, default_nframes, probe) if spec.path is not None else _load_frames(spec, probe)


# ---- given frames -----------------------------------------------------------------------------
def _load_frames(spec: VideoSpec, probe: bool) -> DecodedVideo:
    rate = spec.video_fps or FRAMES_FPS
    frames, total = spec.frames, len(spec.frames)
    if isinstance(frames, np.ndarray):
        source = f"array{list(frames.shape)}"
    else:
        _check_sizes([_frame_size(f, i) for i, f in enumerate(frames)])
        source = f"{total} frames"
    if spec.nframes is None and all(getattr(spec, k) is None for k in FPS_OPTIONS):
        idx, sampled = list(range(total)), rate
    else:
        idx, sampled = plan_indices(spec, total, rate, None)
    return DecodedVideo(frames=[] if probe else [_frame_image(frames[i], i) for i in idx], indices=idx,
                        times=[i / rate for i in idx], video_fps=rate, total_frames=total, sampled_fps=sampled,
                        source=source, frames_usable=total)


def _frame_size(item, i: int) -> tuple[int, int]:
    """(width, height) of one given frame, reading only a file's header."""
    if isinstance(item, Image.Image):
        return item.size
    if isinstance(item, (str, os.PathLike)):
        with _open_image(item, i) as im:
            return im.size
    if is_array(item):
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
    """Frame i (a PIL image, an [H, W, 3] uint8 array / tensor, or an image path) as an RGB image."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if is_array(item):
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
    if total <= 0:  # no duration either: count the packets (no decoding; the cursor seeks before it reads)
        total = sum(1 for p in container.demux(stream) if p.size)
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
        idx, sampled = plan_indices(spec, info.total, rate, default_nframes)
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
                idx, sampled = plan_indices(spec, usable, rate, default_nframes)
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

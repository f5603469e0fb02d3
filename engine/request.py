"""Requests: checking what a user handed in, before any model work.

A request is a prompt plus images (paths or PIL images) and/or a video (a list of frames,
or a file path, decoded with PyAV). Video frames enter the model as a sequence of images,
one placeholder each, so every family handles them the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .errors import InputError
from .plan import Plan

DEFAULT_VIDEO_FRAMES = 8


@dataclass
class Request:
    prompt: str
    images: list = field(default_factory=list)
    video: Any = None
    plan: Plan | None = None
    max_new_tokens: int | None = None

    @classmethod
    def of(cls, item: "Request | dict") -> "Request":
        if isinstance(item, Request):
            return item
        if not isinstance(item, dict) or "prompt" not in item:
            raise InputError(f"a request must be a Request or a dict with a 'prompt', got {item!r:.80}")
        unknown = set(item) - {"prompt", "images", "video", "plan", "max_new_tokens"}
        if unknown:
            raise InputError(f"request has unknown field(s) {sorted(unknown)}")
        return cls(**item)


@dataclass
class CheckedRequest:
    """A request whose inputs were loaded and counted: ``text`` is the chat-formatted prompt."""

    text: str
    images: list[Image.Image]  # images first, then video frames
    n_frames: int
    plan: Plan
    max_new_tokens: int


def load_image(item, label: str) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item):
            raise InputError(f"{label}: file not found: {item}")
        try:
            with Image.open(item) as im:
                return im.convert("RGB")
        except Exception as e:  # PIL raises several types for unreadable files
            raise InputError(f"{label}: cannot read image {item}: {e}") from None
    if hasattr(item, "shape"):  # numpy array / tensor, HWC uint8
        import numpy as np
        try:
            return Image.fromarray(np.asarray(item, dtype="uint8")).convert("RGB")
        except Exception as e:
            raise InputError(f"{label}: cannot convert array of shape {tuple(item.shape)} to an image: {e}") from None
    raise InputError(f"{label}: expected a path or a PIL image, got {type(item).__name__}")


def load_video(video, n_frames: int = DEFAULT_VIDEO_FRAMES) -> list[Image.Image]:
    """A list of frames, or a video file sampled at ``n_frames`` evenly spaced frames."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise InputError("video: empty frame list")
        return [load_image(f, f"video frame {i}") for i, f in enumerate(video)]
    if not isinstance(video, (str, os.PathLike)) or not os.path.isfile(video):
        raise InputError(f"video: file not found: {video}")
    try:
        import av
    except ImportError:
        raise InputError("video: reading video files needs PyAV (pip install 'tokensieve[video]')") from None
    try:
        with av.open(str(video)) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
    except Exception as e:
        raise InputError(f"video: cannot decode {video}: {e}") from None
    if not frames:
        raise InputError(f"video: {video} has no frames")
    idx = [round(i * (len(frames) - 1) / max(n_frames - 1, 1)) for i in range(min(n_frames, len(frames)))]
    return [frames[i].convert("RGB") for i in idx]


def check_request(req: Request, processor, image_token: str, default_plan: Plan, default_max_new: int) -> CheckedRequest:
    """Load and count a request's inputs; build its chat prompt. Raises InputError / PlanError."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise InputError("prompt must be a non-empty string")
    images = req.images if isinstance(req.images, (list, tuple)) else [req.images]
    pil = [load_image(im, f"image {i}") for i, im in enumerate(images or [])]
    frames = load_video(req.video) if req.video is not None else []
    n_tokens = req.prompt.count(image_token)
    if n_tokens:
        if n_tokens != len(pil) + len(frames):
            raise InputError(f"prompt has {n_tokens} '{image_token}' placeholder(s) but {len(pil)} image(s)"
                             + (f" and {len(frames)} video frame(s)" if frames else "") + " were given")
        content = [{"type": "text", "text": req.prompt}]
    else:
        content = [{"type": "image"}] * (len(pil) + len(frames)) + [{"type": "text", "text": req.prompt}]
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = " ".join([image_token] * (0 if n_tokens else len(pil) + len(frames)) + [req.prompt])
    max_new = default_max_new if req.max_new_tokens is None else req.max_new_tokens
    if not isinstance(max_new, int) or max_new < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new!r}")
    plan = default_plan if req.plan is None else Plan.parse(req.plan)
    return CheckedRequest(text=text, images=pil + frames, n_frames=len(frames), plan=plan, max_new_tokens=max_new)

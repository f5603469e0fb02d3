"""Requests: checking what a user handed in, before any model work.

A request is a prompt plus images (paths or PIL images) and/or a video (a file, frames, an
array, or a dict with sampling options: ``engine/video.py``). A video enters the model
natively where the family has a video input (``video_mode="native"``: Qwen2-VL / 2.5-VL
``videos=``, LLaVA-OneVision's ``<video>``), else as a sequence of images, one placeholder
each (``video_mode="frames"``, the only mode of LLaVA-1.5 and LLaVA-NeXT).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .errors import InputError, PlanError
from .frames import check_video_given
from .images import load_image
from .signals import reads
from .plan import Plan

from .video import DecodedVideo, decode_video, probe_video

DEFAULT_VIDEO_FRAMES = 8  # frames sampled when a video gives neither nframes nor fps (the world's videos)
VIDEO_MODES = ("native", "frames")


@dataclass
class Request:
    prompt: str
    images: list = field(default_factory=list)
    video: Any = None
    plan: Plan | None = None
    max_new_tokens: int | None = None
    video_mode: str | None = None  # None: the engine's default
    priority: Any = None  # [N_visual] numbers, one per visual token in order: the ``priority`` pruner keeps the highest

    @classmethod
    def of(cls, item: "Request | dict") -> "Request":
        if isinstance(item, Request):
            return item
        if not isinstance(item, dict) or "prompt" not in item:
            raise InputError(f"a request must be a Request or a dict with a 'prompt', got {item!r:.80}")
        unknown = set(item) - {"prompt", "images", "video", "plan", "max_new_tokens", "video_mode", "priority"}
        if unknown:
            raise InputError(f"request has unknown field(s) {sorted(unknown)}")
        return cls(**item)


@dataclass
class CheckedRequest:
    """A request whose inputs were loaded and counted: ``text`` is the chat-formatted prompt."""

    text: str
    question: str  # the prompt as the user gave it (frame scorers rate frames against it)
    images: list[Image.Image]  # images first, then (video_mode "frames") the video's frames
    n_frames: int  # frames entering as images (video_mode "frames")
    plan: Plan
    max_new_tokens: int
    video: DecodedVideo | None = None
    native_video: bool = False  # the video enters through the processor's ``videos=``
    priority: torch.Tensor | None = None  # [N_visual] float (its length is checked when the batch is laid out)


def check_request(req: Request, processor, adapter, default_plan: Plan, default_max_new: int,
                  default_video_mode: str = "native", video=None, decode: bool = True) -> CheckedRequest:
    """Load and count a request's inputs; build its chat prompt. Raises InputError / PlanError.

    ``video``: the request's video already decoded (a prefetcher's result), else it is decoded here;
    with ``decode=False`` it is only probed (readable, options in range: ``probe_video``) and the
    result is for checking and grouping, not for running.
    """
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise InputError("prompt must be a non-empty string")
    mode = default_video_mode if req.video_mode is None else req.video_mode
    if mode not in VIDEO_MODES:
        raise InputError(f"video_mode must be one of {VIDEO_MODES}, got {mode!r}")
    images = req.images if isinstance(req.images, (list, tuple)) else [req.images]
    pil = [load_image(im, f"image {i}") for i, im in enumerate(images or [])]
    if video is None and isinstance(req.video, DecodedVideo):
        video = req.video
    if video is None and req.video is not None:
        video = (decode_video if decode else probe_video)(req.video, default_nframes=DEFAULT_VIDEO_FRAMES)
    native = video is not None and mode == "native" and adapter.video_token is not None
    if native and pil and not adapter.video_with_images:
        raise InputError(f"'{adapter.family}' cannot take images and a native video in one request (its processor or "
                         "model cannot keep their pixels or tokens apart): give them in separate requests, or "
                         "video_mode='frames'")
    frames = video.frames if video is not None and not native else []
    n_frames = len(video.indices) if video is not None and not native else 0  # frames entering as images
    image_token = adapter.image_token
    n_tokens = req.prompt.count(image_token)
    n_video_tokens = req.prompt.count(adapter.video_token) if native else 0
    if n_tokens or n_video_tokens:
        if n_tokens != len(pil) + n_frames:
            raise InputError(f"prompt has {n_tokens} '{image_token}' placeholder(s) but {len(pil)} image(s)"
                             + (f" and {n_frames} video frame(s)" if n_frames else "") + " were given")
        if native and n_video_tokens != 1:
            raise InputError(f"prompt has {n_video_tokens} '{adapter.video_token}' placeholder(s); a request with a "
                             "video (video_mode='native') needs exactly one")
        content = [{"type": "text", "text": req.prompt}]
    else:
        content = ([{"type": "image"}] * (len(pil) + n_frames) + [{"type": "video"}] * native
                   + [{"type": "text", "text": req.prompt}])
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        placeholders = [] if n_tokens or n_video_tokens else [image_token] * (len(pil) + n_frames)
        text = " ".join(placeholders + [adapter.video_token] * (native and not n_video_tokens) + [req.prompt])
    max_new = default_max_new if req.max_new_tokens is None else req.max_new_tokens
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new!r}")
    plan = default_plan if req.plan is None else Plan.parse(req.plan)
    check_video_given(plan, video, pil)
    priority = check_priority(req.priority, plan)
    return CheckedRequest(text=text, question=req.prompt, images=pil + frames, n_frames=n_frames, plan=plan, max_new_tokens=max_new,
                          video=video, native_video=native, priority=priority)


def check_priority(priority, plan: Plan) -> torch.Tensor | None:
    """A request's token priorities as a [N] float tensor (finite numbers); PlanError when a stage reads
    priorities the request does not give."""
    from ..pruners import get_pruner

    reader = next((s for s in plan.stages if reads(get_pruner(s.pruner), "request.priority")), None)
    if priority is None:
        if reader is not None:
            raise PlanError(f"{reader.describe()} keeps the tokens of highest priority: give the request a priority "
                            "(one number per visual token)")
        return None
    try:
        p = torch.as_tensor(priority, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"priority must be numbers, one per visual token; got {type(priority).__name__}") from None
    if p.dim() != 1 or not torch.isfinite(p).all():
        raise InputError(f"priority must be a 1-D list of finite numbers, got shape {tuple(p.shape)}")
    return p

"""Native video for the tiny Qwen2-VL (issue 29, item 6): a world video entering as one processor video.

Qwen2-VL's patch embedding is a 3-D convolution over a temporal patch of two frames, so 8 frames
become 4 token grids of 64 tokens each (the engine's default ``video_mode="native"``). A still image
or a frame given as an image enters as two copies of itself, so training on images and frames only
never trains what tells the two frames of a patch apart. ``train_tiny --native-fraction`` trains on
native video too: the tower phase on temporal patches of two consecutive frames, the LM steps on
videos through the processor's ``videos=``.

The targets read a native video as its temporal patches: ``temporal_groups`` turns the frames into
one scene per patch, and every per-frame target (``video_targets``, ``objectives``) applies to those
scenes and the patches' tokens unchanged (``video_targets.frame_slots`` finds video tokens too).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import world

TEMPORAL_PATCH = 2  # frames per temporal patch (Qwen2-VL's temporal_patch_size)
FRAMES_FPS = 2.0  # the rate the engine gives a video handed over as frames (engine.video_spec.FRAMES_FPS)


def temporal_groups(frames: list[world.Scene], t: int = TEMPORAL_PATCH) -> list[world.Scene]:
    """One scene per temporal patch of ``t`` consecutive frames [n_frames] -> [n_frames / t]: the objects
    any of its frames shows, each where the latest of those frames shows it (the world's objects move at
    most one cell a frame, so a token of the patch that shows the object in either frame is at most one
    cell from those), on the patch's background."""
    if t < 1 or len(frames) % t:
        raise ValueError(f"a video of {len(frames)} frames does not split into temporal patches of {t}")
    out = []
    for start in range(0, len(frames), t):
        shown: dict[int, world.Obj] = {}
        for scene in frames[start:start + t]:
            shown.update({o.uid: o for o in scene.objects})  # (a later frame's position replaces an earlier one)
        out.append(replace(frames[start + t - 1], objects=list(shown.values())))
    return out


def video_kwargs(proc, videos: list[list]) -> dict:
    """The processor's video kwargs for ``videos`` (each a list of rendered frames), exactly as the engine
    passes a video handed over as frames: every frame at FRAMES_FPS, and the Qwen adapter's per-frame
    pixel cap where the video processor has that option."""
    from transformers.video_utils import VideoMetadata

    kwargs = {"videos": [np.stack([np.asarray(f) for f in frames]) for frames in videos],
              "video_metadata": [VideoMetadata(total_num_frames=len(frames), fps=FRAMES_FPS,
                                               frames_indices=list(range(len(frames)))) for frames in videos]}
    if hasattr(type(proc.video_processor), "cap_pixels_per_frame"):
        kwargs["cap_pixels_per_frame"] = True
    return kwargs


def has_native(proc) -> bool:
    """Whether the processor takes a native video (``videos=``: Qwen2-VL); LLaVA-1.5 reads frames only."""
    return getattr(proc, "video_processor", None) is not None and getattr(proc, "video_token", None) is not None


def add_video_mode_option(ap) -> None:
    """The command-line ``--video-mode`` of the world's measuring tools (``reads_native`` resolves it)."""
    ap.add_argument("--video-mode", choices=("default", "frames", "native"), default="default",
                    help="videos as the engine reads them by default (native on Qwen2-VL, frames on LLaVA), as frames "
                         "(one image each), or as one native video (Qwen2-VL's temporal patches of two frames)")


def reads_native(proc, video_mode: str) -> bool:
    """Whether videos enter natively under ``video_mode`` ("default": as the engine reads the model's videos,
    native where the processor has a video input; "frames"; "native": one clear error where it has none)."""
    if video_mode == "native":
        check_family(proc, "--video-mode native")
    return video_mode == "native" or (video_mode == "default" and has_native(proc))


def check_family(proc, option: str) -> None:
    """One clear error (naming the command-line ``option``) where the model has no native video input
    (LLaVA-1.5 reads a video as frames only)."""
    if not has_native(proc):
        raise SystemExit(f"{option}: {type(proc).__name__} has no native video input (LLaVA-1.5 reads a video as "
                         "frames); native video needs a Qwen2-VL model")

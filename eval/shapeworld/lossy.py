"""Ordinary lossy media: what users' files do to the world's renders (issue 29, item 2).

The world writes its own videos losslessly (``dataset.write_video``: libx264rgb, decoding gives back
the render), but users' images are JPEGs and their videos are 4:2:0 MPEG files: colour at half the
resolution, so a one-cell object bleeds into its neighbours, and block artefacts. These functions
apply exactly that to rendered frames, in memory, with the real codecs (Pillow's JPEG, PyAV's
mpeg4), for training augmentation (``train_tiny --lossy-fraction``) and held-out measurement
(``heldout --codec``).

    jpeg(image, quality)        -> PIL image    # 4:2:0 chroma, DCT quantised at ``quality``
    mpeg4(frames, qscale)       -> [PIL image]  # yuv420p MPEG-4 part 2, fixed quantiser ``qscale``
    degrade(frames, rng)        -> [PIL image]  # one random codec and setting for all frames
"""
from __future__ import annotations

import io
import random

from PIL import Image

CODECS = ("none", "world-mp4", "jpeg", "mpeg4")  # heldout --codec: what the held-out questions' images pass through
JPEG_QUALITY = (30, 90)  # the augmentation's range of JPEG quality
MPEG4_QSCALE = (2, 12)  # ... and of the mpeg4 quantiser (2: near transparent, 12: visibly blocky at 96 px)


def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    """``image`` through a JPEG file (4:2:0 chroma subsampling, Pillow's encoder) and back, RGB."""
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must be 1-95, got {quality}")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=2)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def mpeg4(frames: list[Image.Image], qscale: int = 4, fps: int = 8) -> list[Image.Image]:
    """``frames`` (same size, even sides) through an MPEG-4 part 2 / yuv420p stream at a fixed
    quantiser ``qscale`` (2-31, lower is better) and back: what the world's files were before they became
    lossless, and what most users' videos are."""
    import av

    if not 2 <= qscale <= 31:
        raise ValueError(f"mpeg4 qscale must be 2-31, got {qscale}")
    w, h = frames[0].size
    if w % 2 or h % 2 or any(f.size != (w, h) for f in frames):
        raise ValueError(f"mpeg4 needs frames of one size with even sides, got {sorted({f.size for f in frames})}")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.qmin = stream.codec_context.qmax = qscale
        stream.codec_context.options = {"qscale": str(qscale)}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(f.convert("RGB"))))
        out.mux(stream.encode())
    buf.seek(0)
    with av.open(buf) as src:
        decoded = [f.to_image() for f in src.decode(video=0)]
    if len(decoded) != len(frames):
        raise RuntimeError(f"mpeg4 round trip gave {len(decoded)} frames for {len(frames)}")
    return decoded


def degrade(frames: list[Image.Image], rng: random.Random) -> list[Image.Image]:
    """One draw of ordinary lossy media for an example: a still image (one frame) as a JPEG of random
    quality in ``JPEG_QUALITY``; a video (frames) as an mpeg4 stream at a random ``MPEG4_QSCALE``, or,
    one time in four, as JPEG frames (a video decoded from stills)."""
    if len(frames) > 1 and rng.random() < 0.75:
        return mpeg4(frames, rng.randint(*MPEG4_QSCALE))
    quality = rng.randint(*JPEG_QUALITY)
    return [jpeg(f, quality) for f in frames]


def world_mp4(frames: list[Image.Image]) -> list[Image.Image]:
    """``frames`` written as the world writes its videos (``dataset.write_video``) and read back by the engine's
    reader (``engine.video.decode_video``, every frame): what the evaluation script sees of the world's files."""
    import tempfile

    from ...engine.video import decode_video
    from .dataset import write_video

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/video.mp4"
        write_video(frames, path)
        decoded = decode_video({"path": path, "nframes": len(frames)}).frames
    if len(decoded) != len(frames):
        raise RuntimeError(f"the world's mp4 gave back {len(decoded)} frames for {len(frames)}")
    return decoded


def through(codec: str, frames: list[Image.Image]) -> list[Image.Image]:
    """``frames`` through ``codec`` at its held-out setting (``CODECS``: none; the world's own mp4 files for a
    video (a still image is left as it is: the world writes PNGs); JPEG quality 75 per frame; mpeg4 qscale 4
    for a video, JPEG 75 for a still image)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    if codec == "none" or codec == "world-mp4" and len(frames) == 1:
        return frames
    if codec == "world-mp4":
        return world_mp4(frames)
    if codec == "mpeg4" and len(frames) > 1:
        return mpeg4(frames, 4)
    return [jpeg(f, 75) for f in frames]

"""Ordinary lossy media (issue 29, item 2): the real codecs degrade colour the way 4:2:0 files do, the
world's own files give back what was rendered, and the held-out command can answer through either."""
import random

import numpy as np
import pytest
from PIL import Image

from tokensieve.eval.shapeworld import heldout, lossy, shipped, train_tiny, world


def _columns(a, b, size: int = 32) -> Image.Image:
    """Alternating one-pixel columns of colours ``a`` and ``b``."""
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:, 0::2], arr[:, 1::2] = a, b
    return Image.fromarray(arr)


def _err(x: Image.Image, y: Image.Image) -> float:
    return float(np.abs(np.asarray(x, float) - np.asarray(y, float)).mean())


@pytest.mark.parametrize("codec", ["jpeg", "mpeg4"])
def test_codecs_halve_the_colour_resolution_not_the_brightness(codec):
    """One-pixel columns that differ in colour only (red / green of about equal luma) are blurred far more than
    columns that differ in brightness only (grey levels): the chroma planes of a 4:2:0 stream have half the
    columns. (At full chroma resolution both would come back about equally well.)"""
    chroma = _columns((200, 40, 40), (40, 120, 40))  # luma 101 / 82: mostly a colour difference
    luma = _columns((40, 40, 40), (200, 200, 200))
    go = (lambda im: lossy.jpeg(im, 90)) if codec == "jpeg" else (lambda im: lossy.mpeg4([im, im], 2)[0])
    assert _err(go(chroma), chroma) > 3 * _err(go(luma), luma)


def test_world_mp4_gives_back_exactly_the_rendered_frames_and_mpeg4_does_not():
    video = world.random_video(random.Random(3), n_frames=8, size=96)
    frames = [world.render(s) for s in video.frames]
    back = lossy.through("world-mp4", frames)
    assert [np.asarray(f).tolist() for f in back] == [np.asarray(f).tolist() for f in frames]
    lossy_back = lossy.through("mpeg4", frames)
    assert len(lossy_back) == 8 and min(_err(a, b) for a, b in zip(lossy_back, frames)) > 1


def test_degrade_keeps_the_frame_count_and_size_and_changes_pixels():
    rng = random.Random(0)
    for n in (1, 8):
        frames = [world.render(s) for s in world.random_video(random.Random(n), n_frames=8, size=96).frames[:n]]
        out = lossy.degrade(frames, rng)
        assert len(out) == n and all(f.size == (96, 96) and f.mode == "RGB" for f in out)
        assert _err(out[0], frames[0]) > 0.5


@pytest.mark.parametrize("call, message", [
    (lambda: lossy.jpeg(Image.new("RGB", (8, 8)), 0), "JPEG quality must be 1-95"),
    (lambda: lossy.mpeg4([Image.new("RGB", (9, 8))]), "even sides"),
    (lambda: lossy.mpeg4([Image.new("RGB", (8, 8))], 1), "qscale must be 2-31"),
    (lambda: lossy.through("h265", []), "unknown codec 'h265'"),
])
def test_bad_codec_settings_are_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_heldout_codec_answers_the_same_questions_through_the_codec():
    """``--codec`` changes only the pixels: the same questions (counts per type), and world-mp4 (lossless) the
    same right answers as no codec at all."""
    plain = heldout.measure(shipped.path("llava"), n_images=0, n_videos=4)
    files = heldout.measure(shipped.path("llava"), n_images=0, n_videos=4, codec="world-mp4")
    lossy_run = heldout.measure(shipped.path("llava"), n_images=4, n_videos=4, codec="mpeg4")
    assert files["video world-mp4"] == plain["video"]
    assert {k: c["n"] for k, c in lossy_run["video mpeg4"].items()} == {k: c["n"] for k, c in plain["video"].items()}
    assert set(lossy_run) == {"image mpeg4", "video mpeg4"}


def test_lossy_fraction_outside_0_1_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--lossy-fraction must be in"):
        train_tiny.main(["--out", str(tmp_path), "--lossy-fraction", "1.5"])

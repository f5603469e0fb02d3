"""Video input: frames as a sequence of images (LLaVA, video_mode="frames"), native on Qwen; files via PyAV."""
import pytest
import torch

from conftest import noise_image


def test_frames_as_images(engine_for):
    engine = engine_for("llava")
    frames = [noise_image(i) for i in range(4)]
    res = engine.generate("what appeared first", video=frames, plan="uniform:keep=0.25", max_new_tokens=2)
    assert res.stats["visual_tokens"] == 4 * 64 and len(res.kept[0]) == 64
    items = res.coords[res.kept[0], 0]
    assert torch.bincount(items).tolist() == [16, 16, 16, 16]  # the budget is spread over the frames
    ids = engine.prepare("what appeared first", video=frames)["input_ids"][0]
    assert int((ids == engine.model.config.image_token_id).sum()) == 256


def write_clip(path: str, n: int, w: int, h: int, fps: int) -> str:
    """An mpeg4 file of n flat grey frames (frame i at level 10 i mod 256)."""
    import av
    import numpy as np
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), (i * 10) % 256, np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_video_file(engine_for, tmp_path):
    pytest.importorskip("av")
    path = write_clip(str(tmp_path / "clip.mp4"), n=12, w=64, h=64, fps=8)
    res = engine_for("qwen2_vl").generate("how many objects", video=path, max_new_tokens=2)
    evenly = torch.linspace(0, 11, 8).round().long().tolist()  # 8 of 12 frames, qwen-vl-utils' linspace
    assert res.n_images == 0 and res.stats["frames"] == 8 and res.stats["frame_indices"] == evenly  # native
    assert res.stats["frame_times"] == [i / 8 for i in evenly]
    frames = engine_for("llava").generate("how many objects", video=path, max_new_tokens=2)
    assert frames.n_images == 8 and frames.stats["frame_indices"] == evenly  # LLaVA-1.5: as 8 images


def test_bfloat16_engine(tiny_path):
    import tokensieve
    engine = tokensieve.load(tiny_path("llava"), dtype="bfloat16")
    res = engine.generate("what", images=[noise_image(0)], plan="fastv:layer=2,keep=8", max_new_tokens=3)
    cfg = engine.model.config.text_config
    assert res.stats["kv_cache_bytes"] == sum(res.stats["per_layer_kv_len"]) * 2 * cfg.num_key_value_heads * 16 * 2
    engine.close()


def test_cli_asks_about_a_video_file(tiny_path, tmp_path):
    """``tokensieve run --video`` decodes once, before the model loads, and reports the frames per plan."""
    pytest.importorskip("av")
    import json
    import subprocess
    import sys

    path = write_clip(str(tmp_path / "clip.mp4"), n=16, w=64, h=48, fps=4)
    cmd = [sys.executable, "-m", "tokensieve", "run", "--model", tiny_path("qwen2_vl"), "--video", path, "--nframes", "4",
           "--prompt", "what appeared first", "--plan", "", "--plan", "uniform:keep=0.5", "--max-new-tokens", "2", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["results"]
    assert [r["frame_indices"] for r in rows] == [[0, 5, 10, 15]] * 2
    assert rows[1]["kept_tokens"] == round(rows[0]["visual_tokens"] / 2) and len(rows[1]["tokens_per_frame"]) == 2
    bad = subprocess.run(cmd[:7] + [str(tmp_path / "missing.mp4")] + cmd[8:], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "file not found" in bad.stderr and "Traceback" not in bad.stderr


def test_truncated_file_says_how_many_frames_were_usable(engine_for, tmp_path):
    pytest.importorskip("av")
    path = write_clip(str(tmp_path / "clip.avi"), n=60, w=64, h=48, fps=10)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    res = engine_for("llava").generate("how many objects", video=str(cut), max_new_tokens=1)
    assert res.stats["video_truncated"] and 0 < res.stats["frames_usable"] < 60
    assert max(res.stats["frame_indices"]) < res.stats["frames_usable"] and res.stats["frames"] == 8


def test_cli_warns_about_a_truncated_file(tmp_path):
    pytest.importorskip("av")
    import subprocess
    import sys

    path = write_clip(str(tmp_path / "clip.avi"), n=60, w=64, h=48, fps=10)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    out = subprocess.run([sys.executable, "-m", "tokensieve", "run", "--video", str(cut), "--prompt", "how many objects",
                          "--plan", "", "--max-new-tokens", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ends before its header says" in out.stderr and "decodable frame(s), sampled from those" in out.stderr

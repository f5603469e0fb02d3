"""engine/video.py: qwen-vl-utils frame sampling, bounded PyAV decoding, input checks, the prefetcher.

Videos are written here with PyAV (small: 64 x 48); nothing is downloaded.
"""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from tokensieve.engine.errors import InputError
from tokensieve.engine.video import DecodedVideo, VideoPrefetcher, decode_video, probe_video
from tokensieve.engine.video_spec import VideoSpec, frame_range, sample_indices

av = pytest.importorskip("av")
W, H = 64, 48


# ---- qwen-vl-utils 0.0.14, re-derived from its documented formulas (not imported from the module) ----
def qwen_indices(total, video_fps, ele):
    """calculate_video_frame_range + smart_nframes + linspace: ValueError where qwen-vl-utils raises."""
    start, end = ele.get("video_start"), ele.get("video_end")
    if start is None and end is None:
        first, last = 0, total - 1
    else:
        duration = total / video_fps
        first = math.ceil(max(0.0, min(start, duration)) * video_fps) if start is not None else 0
        last = min(math.floor(max(0.0, min(end, duration)) * video_fps), total - 1) if end is not None else total - 1
        if first >= last:
            raise ValueError("empty range")
    count = last - first + 1
    if "nframes" in ele:
        n = round(ele["nframes"] / 2) * 2
    else:
        lo = math.ceil(ele.get("min_frames", 4) / 2) * 2
        hi = math.floor(ele.get("max_frames", min(768, count)) / 2) * 2
        n = math.floor(min(min(max(count / video_fps * ele.get("fps", 2.0), lo), hi), count) / 2) * 2
    if not 2 <= n <= count:
        raise ValueError("nframes out of range")
    return torch.linspace(first, last, n).round().long().tolist()


SAMPLING = [  # (total frames, video fps, options)
    (100, 10, {}), (100, 10, {"fps": 1.0}), (100, 10, {"fps": 0.1}), (100, 10, {"fps": 50.0}),
    (100, 10, {"nframes": 8}), (100, 10, {"nframes": 7}), (100, 10, {"nframes": 5}), (100, 10, {"nframes": 3}),
    (100, 10, {"nframes": 100}), (101, 10, {"nframes": 101}), (18000, 30, {}), (18000, 30, {"fps": 0.05}),
    (18000, 30, {"max_frames": 64}), (18000, 30, {"fps": 1.0, "max_frames": 65}), (300, 30, {"min_frames": 16}),
    (300, 30, {"min_frames": 15, "fps": 0.5}), (7, 30, {}), (5, 25, {"fps": 0.1}), (3, 30, {}),
    (100, 10, {"video_start": 2.0}), (100, 10, {"video_end": 5.5}), (100, 10, {"video_start": 1.05, "video_end": 3.0}),
    (100, 10, {"video_start": 2.0, "video_end": 50.0, "nframes": 16}), (100, 10, {"video_start": 0.0, "fps": 4.0}),
    (90, 29.97, {"video_start": 0.5, "video_end": 2.5}), (100, 10, {"nframes": 1}), (100, 10, {"nframes": 102}),
    (1, 10, {}), (100, 10, {"video_start": 3.0, "video_end": 3.05}), (100, 10, {"max_frames": 1}),
]


def _ours(total, fps, ele):
    kw = {"start" if k == "video_start" else "end" if k == "video_end" else k: v for k, v in ele.items()}
    return sample_indices(total, fps, **kw)


@pytest.mark.parametrize("total,fps,ele", SAMPLING)
def test_sampling_follows_qwen_vl_utils(total, fps, ele):
    try:
        expected = qwen_indices(total, fps, ele)
    except ValueError:
        with pytest.raises(InputError):
            _ours(total, fps, ele)
        return
    got = _ours(total, fps, ele)
    assert got == expected and len(got) % 2 == 0
    first, last = frame_range(total, fps, ele.get("video_start"), ele.get("video_end"))
    assert first <= got[0] and got[-1] <= last


# ---- writing test videos ----------------------------------------------------------------------
def _content(n, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, H, W, 3), dtype=np.uint8)


def _write(path, frames, codec="ffv1", rate=10, pix_fmt=None, **stream_opts):
    if codec not in av.codecs_available:
        pytest.skip(f"PyAV has no {codec} encoder")
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, options=stream_opts)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt or ("bgr0" if codec == "ffv1" else "yuv420p")
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def _decode_all(path):
    """Every frame of a file, decoded front to back (the reference for lossy codecs)."""
    with av.open(path) as c:
        s = c.streams.video[0]
        return {round(f.pts * s.time_base * s.average_rate): f.to_ndarray(format="rgb24") for f in c.decode(s)}


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    frames = _content(100)
    return _write(tmp_path_factory.mktemp("v") / "clip.mkv", frames), frames


@pytest.mark.parametrize("options", [{"nframes": 8}, {"nframes": 40}, {"fps": 3.0}, {}, {"start": 2.5, "end": 7.0}])
def test_decoded_frames_are_the_written_frames(lossless, options):
    path, written = lossless
    video = decode_video({"path": path, **options})
    assert video.indices == sample_indices(100, 10.0, **options)
    assert [f.size for f in video.frames] == [(W, H)] * len(video.indices)
    for frame, i in zip(video.frames, video.indices):
        assert np.abs(np.asarray(frame).astype(int) - written[i]).max() <= 1
    assert video.times == pytest.approx([i / 10 for i in video.indices], abs=1e-6)
    assert (video.video_fps, video.total_frames, video.truncated, video.frames_usable) == (10.0, 100, False, 100)
    first, last = frame_range(100, 10.0, options.get("start"), options.get("end"))
    assert video.sampled_fps == pytest.approx(len(video.indices) / (last - first + 1) * 10)


@pytest.mark.parametrize("codec,suffix,opts", [("mpeg4", ".mp4", {"g": "12"}), ("mpeg4", ".avi", {"g": "5"}),
                                               ("libx264", ".mp4", {"g": "30", "bf": "2"}), ("libvpx", ".webm", {})])
def test_seeking_in_gop_codecs_gives_the_frames_of_a_full_decode(tmp_path, codec, suffix, opts):
    path = _write(tmp_path / f"clip{suffix}", _content(120, seed=1), codec=codec, rate=24, **opts)
    full = _decode_all(path)
    for options in ({"nframes": 8}, {"nframes": 64}, {"fps": 6.0}, {"start": 1.0, "end": 3.0, "nframes": 6}):
        video = decode_video({"path": path, **options})
        assert video.indices == sample_indices(120, 24.0, **options)
        assert all(np.array_equal(np.asarray(f), full[i]) for f, i in zip(video.frames, video.indices))
        assert video.times == pytest.approx([i / 24 for i in video.indices], abs=1e-3)


def test_default_nframes_applies_when_no_sampling_option_is_given(lossless, tmp_path):
    path, _ = lossless
    assert decode_video(path, default_nframes=8).indices == sample_indices(100, 10, nframes=8)
    assert decode_video(path).indices == sample_indices(100, 10)  # fps 2: 20 frames
    assert decode_video({"path": path, "fps": 1.0}, default_nframes=8).indices == sample_indices(100, 10, fps=1.0)
    assert len(decode_video({"path": path, "max_frames": 6}, default_nframes=8).indices) == 6
    short = _write(tmp_path / "short.mkv", _content(5))
    assert decode_video(short, default_nframes=8).indices == [0, 1, 3, 4]  # clamped to the frames, even
    assert decode_video(f"file://{path}", default_nframes=8).source == path


def test_probe_plans_without_decoding(lossless):
    path, _ = lossless
    probe = probe_video({"path": path, "nframes": 6}, default_nframes=8)
    assert probe.frames == [] and probe.indices == sample_indices(100, 10, nframes=6)
    assert probe.total_frames == 100 and probe.times == pytest.approx([i / 10 for i in probe.indices])


# ---- bounded memory ---------------------------------------------------------------------------
def test_peak_memory_does_not_grow_with_the_video_length(tmp_path):
    frames = np.random.RandomState(2).randint(0, 256, (30, 72, 96, 3), dtype=np.uint8)
    long = _write(tmp_path / "long.mp4", np.repeat(frames, 100, axis=0), codec="mpeg4", rate=30)
    short = _write(tmp_path / "short.mp4", frames, codec="mpeg4", rate=30)
    # a fresh process; before each step the free heap is trimmed and the peak RSS reset (Linux: clear_refs
    # 5), so each figure is the growth of the peak over the resident size, in MB. The peak is VmHWM, the
    # same high-water mark as ru_maxrss, which cannot be used here: execve carries the parent's peak over
    engine_dir = os.path.dirname(sys.modules[decode_video.__module__].__file__)
    script = textwrap.dedent(f"""
        import ctypes, gc, sys, types, av
        for name, path in (("tokensieve", None), ("tokensieve.engine", {engine_dir!r})):  # the module alone:
            sys.modules[name] = types.ModuleType(name)                                  # no transformers import
            sys.modules[name].__path__ = [path] if path else []
        from tokensieve.engine.video import decode_video
        def peak_kb():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
        def grown(step):
            gc.collect()
            ctypes.CDLL(None).malloc_trim(0)  # freed heap back to the system: growth is not hidden by reuse
            try:
                open("/proc/self/clear_refs", "w").write("5")  # the peak RSS := the RSS now
            except OSError:
                return float("nan")
            before = peak_kb()
            step()
            return (peak_kb() - before) / 1024
        def old_way():  # every frame decoded and kept (the loader this module replaces)
            with av.open({long!r}) as c:
                frames = [f.to_image() for f in c.decode(video=0)]
        decode_video({short!r}, default_nframes=8)  # warm-up: codec set-up
        out = [grown(lambda: decode_video({short!r}, default_nframes=8)),
               grown(lambda: decode_video({long!r}, default_nframes=8)), grown(old_way)]
        assert len(decode_video({long!r}, default_nframes=8).frames) == 8
        print(*out)
    """)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="8192")  # frames get pages of their own: no reuse hides them
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    short_mb, long_mb, old_mb = map(float, out.stdout.split())
    if math.isnan(long_mb):
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    assert long_mb < 8 and long_mb - short_mb < 4, (short_mb, long_mb)  # 3000 frames, 8 kept: no growth
    assert old_mb > 40, old_mb  # keeping all 3000 frames (3000 * 96 * 72 * 3 B = 62 MB) shows: the measure works


# ---- broken files -----------------------------------------------------------------------------
def test_a_truncated_file_decodes_as_far_as_it_goes(lossless, tmp_path):
    path, written = lossless
    data = open(path, "rb").read()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    video = decode_video({"path": str(cut), "nframes": 8})
    assert video.truncated and 20 <= video.frames_usable < 100 and video.total_frames == video.frames_usable
    assert video.indices == sample_indices(video.frames_usable, 10, nframes=8)
    for frame, i in zip(video.frames, video.indices):
        assert np.abs(np.asarray(frame).astype(int) - written[i]).max() <= 1
    assert probe_video(str(cut)).truncated is False  # a probe trusts the header


@pytest.mark.parametrize("content,words", [(b"", r"empty \(0 bytes\)"), (b"this is not a video\n" * 50, "cannot read"),
                                           (None, "file not found")])
def test_unreadable_files_are_refused(tmp_path, content, words):
    path = tmp_path / "clip.mp4"
    if content is not None:
        path.write_bytes(content)
    for fn in (decode_video, probe_video):
        with pytest.raises(InputError, match=words):
            fn(str(path))


@pytest.mark.parametrize("suffix,words", [(".avi", "has no video frames"), (".mkv", "cannot read"),
                                          (".mp4", "has no video stream")])
def test_a_file_without_frames_is_refused(tmp_path, suffix, words):
    path = str(tmp_path / f"empty{suffix}")
    with av.open(path, "w") as out:  # a header, no frame
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        out.start_encoding()
    for fn in (decode_video, probe_video):
        with pytest.raises(InputError, match=words):
            fn(path)


def test_a_file_cut_inside_its_first_frame_is_refused(tmp_path):
    path = _write(tmp_path / "clip.mkv", np.repeat(_content(1), 10, axis=0), codec="mpeg4")
    data = open(path, "rb").read()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[:len(data) // 2])  # the header and part of the first frame (noise; the rest: repeats)
    with pytest.raises(InputError, match="has no decodable frames"):
        decode_video(str(cut))
    with pytest.raises(InputError, match="has no decodable frames"):
        probe_video(str(cut))


def test_missing_pyav_says_how_to_install(lossless, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(InputError, match=r"pip install 'tokensieve\[video\]'"):
        decode_video(lossless[0])


# ---- frames, arrays, tensors --------------------------------------------------------------------
def test_frames_arrays_and_tensors(tmp_path):
    frames = _content(6, seed=4)
    paths = []
    for i, a in enumerate(frames):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(a).save(paths[-1])
    forms = [frames, torch.from_numpy(frames), list(frames), [Image.fromarray(a) for a in frames], paths,
             [torch.from_numpy(a) for a in frames], tuple(paths)]
    for form in forms:
        video = decode_video(form, default_nframes=2)  # the default does not apply to given frames
        assert video.indices == list(range(6)) and video.times == pytest.approx([i / 2.0 for i in range(6)])
        assert all(np.array_equal(np.asarray(f), a) for f, a in zip(video.frames, frames))
        assert video.video_fps == 2.0 and video.sampled_fps == 2.0 and not video.truncated
    video = decode_video({"frames": list(frames), "nframes": 4, "video_fps": 4.0})
    assert video.indices == sample_indices(6, 4.0, nframes=4) and video.times == [i / 4 for i in video.indices]
    assert all(np.array_equal(np.asarray(f), frames[i]) for f, i in zip(video.frames, video.indices))
    assert decode_video({"frames": frames, "fps": 1.0, "video_fps": 3.0}).indices == sample_indices(6, 3.0, fps=1.0)
    gray = decode_video([Image.new("L", (W, H), 7)] * 2).frames[0]
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (7, 7, 7)
    assert probe_video(paths).frames == [] and probe_video(paths).indices == list(range(6))


def _sized(w, h):
    return Image.new("RGB", (w, h))


BAD_INPUTS = [  # (video, words in the message)
    (np.zeros((4, H, W), np.uint8), "[T, H, W, 3] uint8"),
    (np.zeros((4, H, W, 4), np.uint8), "[T, H, W, 3] uint8"),
    (np.zeros((4, H, W, 3), np.float32), "dtype float32"),
    (torch.zeros(4, H, W, 3), "[T, H, W, 3] uint8"),
    (np.zeros((0, H, W, 3), np.uint8), "no frames"),
    ([], "non-empty list"),
    ({"frames": []}, "non-empty list"),
    ([_sized(W, H), _sized(W, H), _sized(32, 24)], "frame 2 is 32x24 but frame 0 is 64x48"),
    ([np.zeros((H, W, 3), np.uint8), np.zeros((H, W + 2, 3), np.uint8)], "frame 1 is 66x48"),
    ([_sized(W, H), np.zeros((H, W), np.uint8)], "video frame 1: array of shape [48, 64]"),
    ([_sized(W, H), 3], "video frame 1: expected an image path"),
    ([_sized(W, H), "/nonexistent/f.png"], "video frame 1: file not found"),
    (42, "expected a file path"),
    ({"path": "x.mp4", "frames": [1]}, "exactly one of 'path'"),
    ({"nframes": 8}, "exactly one of 'path'"),
    ({"frames": [_sized(W, H)] * 4, "nfames": 2}, "unknown key(s) ['nfames']"),
    ({"path": 5}, "'path' must be a file path"),
]
OPTIONS = [  # (options on 10 frames at 5 fps, words)
    ({"nframes": 0}, "nframes must be a positive int"),
    ({"nframes": -2}, "nframes must be a positive int"),
    ({"nframes": True}, "nframes must be a positive int"),
    ({"nframes": 4.0}, "nframes must be a positive int"),
    ({"nframes": "8"}, "nframes must be a positive int"),
    ({"nframes": 12}, "nframes=12 gives 12 frames"),
    ({"nframes": 1}, "nframes=1 gives 0 frames"),
    ({"max_frames": 1}, "max_frames=1 gives 0 frames"),
    ({"fps": 0}, "fps must be a positive finite number"),
    ({"fps": float("nan")}, "fps must be a positive"),
    ({"fps": float("inf")}, "fps must be a positive"),
    ({"fps": True}, "fps must be a positive"),
    ({"fps": "2"}, "fps must be a positive"),
    ({"min_frames": 0}, "min_frames must be a positive int"),
    ({"max_frames": 2.5}, "max_frames must be a positive int"),
    ({"min_frames": 8, "max_frames": 4}, "min_frames (8) exceeds max_frames (4)"),
    ({"nframes": 4, "fps": 1.0}, "mutually exclusive"),
    ({"nframes": 4, "max_frames": 6}, "not with nframes"),
    ({"start": -1.0}, "start must be a non-negative finite number"),
    ({"start": float("nan")}, "start must be"),
    ({"start": True}, "start must be"),
    ({"end": 0}, "end must be a positive finite number"),
    ({"end": float("inf")}, "end must be"),
    ({"start": 1.0, "end": 1.0}, "start (1 s) must be before end (1 s)"),
    ({"start": 2.5}, "beyond the video's duration"),
    ({"start": 1.0, "end": 1.1}, "covers fewer than 2 frames"),
    ({"video_fps": 0}, "video_fps must be a positive"),
    ({"video_fps": float("nan")}, "video_fps must be"),
]


@pytest.mark.parametrize("video,words", BAD_INPUTS)
def test_bad_inputs_are_refused_with_the_problem_named(video, words):
    for fn in (decode_video, probe_video):
        with pytest.raises(InputError) as e:
            fn(video)
        assert words in str(e.value)


@pytest.mark.parametrize("options,words", OPTIONS)
def test_bad_options_are_refused_with_the_field_named(options, words):
    with pytest.raises(InputError) as e:
        decode_video({"frames": _content(10), "video_fps": 5.0, **options})
    assert words in str(e.value)


def test_option_rules_specific_to_files_and_frames(lossless):
    with pytest.raises(InputError, match="need 'video_fps'"):
        decode_video({"frames": _content(10), "start": 1.0})
    with pytest.raises(InputError, match="video_fps applies to frames only"):
        decode_video({"path": lossless[0], "video_fps": 4.0})
    with pytest.raises(InputError, match="beyond the video's duration"):
        probe_video({"path": lossless[0], "start": 10.0})
    with pytest.raises(InputError, match="default_nframes must be a positive int"):
        decode_video(lossless[0], default_nframes=0)
    assert VideoSpec.parse({"path": lossless[0], "nframes": np.int64(4)}).nframes == 4


# ---- the prefetcher ---------------------------------------------------------------------------
def test_prefetcher_matches_direct_decoding_and_reraises_per_item(lossless, tmp_path):
    path, _ = lossless
    other = _write(tmp_path / "other.mp4", _content(50, seed=5), codec="mpeg4", rate=25)
    items = {"a": (path, 8), "b": ({"path": other, "fps": 4.0}, None), "c": (str(tmp_path / "missing.mp4"), 8),
             "d": (_content(4), 8)}
    with VideoPrefetcher(max_workers=2) as pool:
        for key, (video, default) in items.items():
            pool.submit(key, video, default)
        with pytest.raises(InputError, match="file not found"):
            pool.result("c")
        for key in ("d", "b", "a"):
            got, direct = pool.result(key), decode_video(*items[key])
            assert isinstance(got, DecodedVideo) and got.indices == direct.indices and got.times == direct.times
            assert all(np.array_equal(np.asarray(f), np.asarray(g)) for f, g in zip(got.frames, direct.frames))
        with pytest.raises(KeyError):
            pool.result("a")  # taken already
    with pytest.raises(RuntimeError):
        pool.submit("e", path, 8)  # shut down with the block

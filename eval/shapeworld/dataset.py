"""The shape world on disk: a dataset of PNG images and MP4 videos with a JSONL of questions.

    write_dataset("out/", n_images=100, n_videos=20, seed=0)   # dataset.jsonl + images/*.png + videos/*.mp4

Records: {"id", "image" | "video", "question", "options", "answer", "type"} (videos also "n_frames"); a
multiple-choice record has options ["A. red", ...] and a letter as answer. Videos are written losslessly
(``write_video``), so reading them back gives exactly what was rendered.
"""
from __future__ import annotations

import json
import os
import random

from PIL import Image

from .phrasing import maybe_typed
from .world import QA, image_questions, multiple_choice, random_scene, random_video, render, video_questions


def write_video(frames: list[Image.Image], path: str, fps: int = 4) -> None:
    """An MP4 that decodes back to exactly the rendered pixels: H.264 in RGB, lossless (qp 0). (The world's
    earlier mpeg4 / yuv420p files halved the colour resolution, so a one-cell object bled into its
    neighbours and file-read videos were answered far worse than the same frames given as images.)"""
    import av
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "rgb24"
        stream.options = {"qp": "0", "preset": "medium"}
        for im in frames:
            for packet in stream.encode(av_frame(im)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def av_frame(im: Image.Image):
    import av
    return av.VideoFrame.from_image(im)


def write_dataset(out_dir: str, n_images: int, n_videos: int = 0, seed: int = 0, mc_fraction: float = 0.2,
                  size: int = 128, progress: bool = True, typed_fraction: float = 0.0) -> str:
    """Write ``dataset.jsonl`` plus images/*.png and videos/*.mp4 under out_dir; returns the JSONL path.
    ``typed_fraction``: the share of open questions written the ways people type them (``phrasing.rephrase``;
    0: none, and the draws are those of the world's wording alone).

    Records are flushed as they are made, so an interrupted run keeps what it wrote.
    """
    from tqdm import tqdm
    if not 0 <= typed_fraction <= 1:
        raise ValueError(f"typed_fraction must be in [0, 1], got {typed_fraction}")
    rng = random.Random(seed)

    def ask(qa: QA) -> QA:
        qa = multiple_choice(qa, rng) if rng.random() < mc_fraction else qa
        return maybe_typed(qa, rng, typed_fraction)

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    if n_videos:
        os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    path = os.path.join(out_dir, "dataset.jsonl")
    with open(path, "w") as f:
        for i in tqdm(range(n_images), desc="images", disable=not progress):
            scene = random_scene(rng, size=size)
            rel = f"images/{i:06d}.png"
            render(scene).save(os.path.join(out_dir, rel))
            for j, qa in enumerate(map(ask, image_questions(scene, rng))):
                f.write(json.dumps({"id": f"img{i}-{j}", "image": rel, "question": qa.question, "options": qa.options,
                                    "answer": qa.answer, "type": qa.type}) + "\n")
            f.flush()
        for i in tqdm(range(n_videos), desc="videos", disable=not progress):
            video = random_video(rng, size=size)
            rel = f"videos/{i:06d}.mp4"
            write_video([render(s) for s in video.frames], os.path.join(out_dir, rel))
            for j, qa in enumerate(map(ask, video_questions(video, rng))):
                f.write(json.dumps({"id": f"vid{i}-{j}", "video": rel, "n_frames": len(video.frames),
                                    "question": qa.question, "options": qa.options, "answer": qa.answer,
                                    "type": qa.type}) + "\n")
            f.flush()
    return path

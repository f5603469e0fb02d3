"""Shipped assets of issue 5: the tiny open_clip model (loads offline with open_clip itself, ranks
frames by a text query), and the pruning-report machinery (cells, resume, table, plot)."""
import json
import os

import pytest
import torch

from tokensieve.eval.shapeworld import report
from tokensieve.eval.shapeworld import shipped, world

MAX_BYTES = 25 * 2**20


def _bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def test_open_clip_model_loads_offline_and_ranks_frames():
    open_clip = pytest.importorskip("open_clip")
    path = shipped.path("clip")
    assert _bytes(path) <= MAX_BYTES
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    frames = [world.Scene([world.Obj("circle", "red", "big", 0.3, 0.4)], size=96, background_seed=1),
              world.Scene([world.Obj("square", "blue", "big", 0.6, 0.5)], size=96, background_seed=2),
              world.Scene([world.Obj("star", "yellow", "big", 0.5, 0.6)], size=96, background_seed=3)]
    queries = ["a big red circle", "a big blue square", "a big yellow star"]
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(world.render(f)) for f in frames])), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(queries)), dim=-1)
    sim = txt @ img.T  # [query, frame]: each query's own frame scores highest
    assert sim.argmax(1).tolist() == [0, 1, 2]


def test_report_cells_resume_table_and_plot(tiny_path, tmp_path):
    pytest.importorskip("matplotlib")
    models = {"tiny": tiny_path("llava")}
    cells = report.run(models, ["uniform", "fastv"], [0.5, 0.25], n_images=4, n_videos=2, out=str(tmp_path))
    assert len(cells) == 1 + 2 * 2
    by = {(c["pruner"], c["budget"]): c for c in cells}
    assert by[("none", None)]["kept_fraction"] == {"image": 1.0, "video": 1.0}
    assert by[("uniform", 0.25)]["kept_fraction"]["image"] == 0.25  # 16 of the tiny model's 64 tokens
    assert by[("fastv", 0.5)]["plan"] == "fastv:layer=2,keep=0.5"  # the report's default LLM layer
    assert by[("uniform", 0.5)]["n"]["image"] == 4 and by[("uniform", 0.5)]["n"]["video"] == 2
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    again = report.run(models, ["uniform", "fastv"], [0.5, 0.25], n_images=4, n_videos=2, out=str(tmp_path))
    assert (tmp_path / "cells.jsonl").read_text().splitlines() == lines and len(again) == len(cells)  # nothing redone
    text = report.write(again, str(tmp_path))
    assert "| uniform |" in text and "tiny 25%" in text and (tmp_path / "report.png").stat().st_size > 0
    assert json.loads(lines[0])["pruner"] == "none"
    # another --llm-layer re-measures the LLM-stage cells only, and the table shows only the new ones
    other = report.run(models, ["uniform", "fastv"], [0.5, 0.25], n_images=4, n_videos=2, out=str(tmp_path),
                       llm_layer=3)
    added = [json.loads(x) for x in (tmp_path / "cells.jsonl").read_text().splitlines()[len(lines):]]
    assert sorted(c["plan"] for c in added) == ["fastv:layer=3,keep=0.25", "fastv:layer=3,keep=0.5"]
    assert len(other) == len(cells) and {c["plan"] for c in other if c["pruner"] == "fastv"} == {
        "fastv:layer=3,keep=0.25", "fastv:layer=3,keep=0.5"}


def test_held_out_questions_cover_every_type():
    qs = report.held_out(n_images=20, n_videos=8)
    assert {q.type for q in qs if q.kind == "image"} == {"colour", "shape", "count", "exist", "position"}
    assert {q.type for q in qs if q.kind == "video"} == {"appeared", "order", "ever", "distinct"}
    assert all(len(q.images) == 8 for q in qs if q.kind == "video")

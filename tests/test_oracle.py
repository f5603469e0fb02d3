"""The report's oracle (issue 29, item 5): ranks from the scene's ground truth, kept through the engine's
``priority`` pruner, on the layout of every shipped family's visual tokens."""
import pytest
import torch

from tokensieve.eval.shapeworld import oracle, report
from tokensieve.eval.shapeworld import shipped, world
from tokensieve.eval.shapeworld.tiny_models import GRID, IMAGE

# a 128-px scene on the 8 x 8 token grid (16 px a cell): a big red square over cells (1..2, 1..2), a small
# blue circle inside cell (6, 6)
SQUARE = world.Obj("square", "red", "big", x=0.25, y=0.25, uid=7)
CIRCLE = world.Obj("circle", "blue", "small", x=6.5 / 8, y=6.5 / 8, uid=9)
SCENE = world.Scene([SQUARE, CIRCLE], size=IMAGE)


def _cells(p, lo, hi):
    return sorted(int(i) for i in ((p >= lo) & (p < hi)).nonzero().flatten())


def test_oracle_ranks_the_asked_object_then_the_others_then_background():
    pixels = world.object_map(SCENE)  # reference: which cells each object shows in, from the rendered map
    cell = IMAGE // GRID
    shows = {v: sorted({(r // cell) * GRID + c // cell for r, c in zip(*(pixels == v).nonzero())}) for v in (1, 2)}
    p = oracle.oracle_priority([SCENE], refs=(7,), grid=GRID)
    assert p.shape == (GRID * GRID,)
    assert _cells(p, 2, 3.01) == shows[1]  # the square the question is about: rank 2 + cover
    assert _cells(p, 1, 2) == [c for c in shows[2] if c not in shows[1]]  # the circle: 1 + cover
    assert int((p < 1).sum()) == GRID * GRID - len(set(shows[1]) | set(shows[2]))  # background
    for i in range(GRID * GRID):  # the exact rank: 2 + the share of the cell the square fills, 1 + the circle's
        block = pixels[(i // GRID) * cell:(i // GRID + 1) * cell, (i % GRID) * cell:(i % GRID + 1) * cell]
        sq, ci = float((block == 1).mean()), float((block == 2).mean())
        r, c = divmod(i, GRID)  # background: the 2 x 2 lattice of every 4th cell (offset 1), then every 2nd
        bg = 0.5 if r % 4 == 1 and c % 4 == 1 else (0.25 if r % 2 == 1 and c % 2 == 1 else 0.0)
        assert float(p[i]) == pytest.approx(2 + sq if sq else (1 + ci if ci else bg))
    q = oracle.oracle_priority([SCENE, SCENE], refs=(9,), grid=GRID)  # frames in order; now the circle first
    assert q.shape == (2 * GRID * GRID,) and _cells(q[64:], 2, 3.01) == shows[2]


@pytest.mark.parametrize("name", list(shipped.MODELS))
def test_priority_keeps_the_oracle_cells_on_each_shipped_family(name):
    """The engine keeps exactly the cells the oracle ranks first: each family lays out an image's tokens in
    raster order of the same 8 x 8 grid (checked from the adapter's coordinates)."""
    import tokensieve
    with tokensieve.load(shipped.path(name)) as engine:
        coords = engine.adapter.image_coords(engine.prepare("what", images=[world.render(SCENE)]))[0]
        assert coords[:, 1].tolist() == [i // GRID for i in range(GRID * GRID)]
        assert coords[:, 2].tolist() == [i % GRID for i in range(GRID * GRID)]
        p = oracle.oracle_priority([SCENE], refs=(7,), grid=GRID)
        res = engine.generate("what colour is the square ?", images=[world.render(SCENE)], plan="priority:keep=4",
                              priority=p, max_new_tokens=1)
        assert res.kept[0].tolist() == sorted(torch.topk(p, 4).indices.tolist()) == [9, 10, 17, 18]


def test_report_shows_the_oracle_and_the_shares(tiny_path, tmp_path):
    models = {"tiny": shipped.path("llava")}
    cells = report.run(models, [report.ORACLE, "random"], [0.25], n_images=6, n_videos=2, out=str(tmp_path))
    by = {(c["pruner"], c["budget"]): c for c in cells}
    assert by[(report.ORACLE, 0.25)]["plan"] == "priority:keep=0.25"
    text = report.write(cells, str(tmp_path))
    assert "accuracy as a share of the oracle's" in text
    o, r = by[(report.ORACLE, 0.25)]["accuracy"]["image"], by[("random", 0.25)]["accuracy"]["image"]
    if o:
        assert f"| random | {100 * r / o:.0f} |" in text
    assert text.index("| oracle |") < text.index("| random |")


def test_native_video_tokens_rank_as_the_best_frame_of_their_temporal_patch():
    """Qwen2-VL reads 4 frames as 2 temporal patches of 2: a token ranks as its cell's best frame in its
    patch (the square in frames 0-1, the circle in frame 3 only)."""
    empty = world.Scene([], size=IMAGE)
    frames = [world.Scene([SQUARE], size=IMAGE), empty, empty, world.Scene([CIRCLE], size=IMAGE)]
    per_frame = oracle.oracle_priority(frames, refs=(9,), grid=GRID).view(4, GRID * GRID)
    coords = torch.tensor([(t, r, c) for t in range(2) for r in range(GRID) for c in range(GRID)])
    p = oracle.per_video_token(per_frame.flatten(), coords, GRID)
    assert p.shape == (2 * GRID * GRID,)
    square = [9, 10, 17, 18]  # cells (1..2, 1..2): another object, 1 + its full cover, in patch 0 only (frame 1 is empty)
    assert _cells(p[:64], 1, 2.01) == square and torch.equal(p[:64][square], per_frame[0][square])
    assert _cells(p[64:], 2, 3.01) == [54]  # the circle (asked about), cell (6, 6), in patch 1 only
    assert _cells(p[:64], 2, 3.01) == [] and _cells(p[64:], 1, 2.01) == []


def test_report_ranks_a_native_video_per_video_token():
    """Through the engine's native video on the shipped Qwen2-VL: as many ranks as video tokens (8 frames ->
    4 patches of 64), each the best of its two frames."""
    import tokensieve
    q = report.held_out(0, 1)[0]
    with tokensieve.load(shipped.path("qwen2_vl")) as engine:
        assert engine.video_mode == "native"
        p = report.request_priority(engine, q)
        res = engine.generate(q.question, video=q.images, plan="priority:keep=0.25", priority=p, max_new_tokens=1)
    frames = q.priority.view(4, 2, GRID * GRID).amax(1).flatten()  # patch t = frames 2t, 2t + 1
    assert torch.equal(p, frames) and res.stats["visual_tokens"] == 4 * GRID * GRID
    with tokensieve.load(shipped.path("qwen2_vl"), video_mode="frames") as engine:
        assert torch.equal(report.request_priority(engine, q), q.priority)

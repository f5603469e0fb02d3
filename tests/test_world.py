"""The synthetic world: determinism, explicit scenes, question correctness, dataset files."""
import json
import random

import numpy as np
import pytest

from tokensieve.eval.shapeworld.dataset import write_dataset
from tokensieve.eval.shapeworld.world import (COLOURS, Obj, Scene, image_questions, multiple_choice, random_scene, random_video,
                                   render, video_questions)


def test_deterministic_for_a_seed():
    a, b = random_scene(random.Random(3)), random_scene(random.Random(3))
    assert a == b and np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert random_scene(random.Random(4)) != a
    qa1 = [q.__dict__ for q in image_questions(a, random.Random(1))]
    assert qa1 == [q.__dict__ for q in image_questions(b, random.Random(1))]


def test_explicit_scene_renders_objects_where_asked():
    scene = Scene([Obj("circle", "red", "big", 0.25, 0.25), Obj("square", "blue", "small", 0.75, 0.75)], size=128)
    px = np.asarray(render(scene))
    assert tuple(px[32, 32]) == COLOURS["red"] and tuple(px[96, 96]) == COLOURS["blue"]
    assert tuple(px[96, 32]) not in COLOURS.values()  # background elsewhere, textured
    assert np.asarray(render(scene))[:, :, 0].std() > 5


def test_question_answers_follow_the_scene():
    scene = Scene([Obj("circle", "red", "big", 0.2, 0.2), Obj("square", "blue", "small", 0.8, 0.8),
                   Obj("star", "red", "small", 0.8, 0.2)])
    for seed in range(20):
        for qa in image_questions(scene, random.Random(seed)):
            q = qa.question
            if q.startswith("what colour is the circle"):
                assert qa.answer == "red"
            if q == "how many red objects are there ?":
                assert qa.answer == "2"
            if q == "is the blue square on the left or right ?":
                assert qa.answer == "right"
            if q == "which quadrant is the red star in ?":
                assert qa.answer == "top-right"
            if q.startswith("is there a red circle"):
                assert qa.answer == "yes"
    mc = multiple_choice(image_questions(scene, random.Random(0))[0], random.Random(0))
    assert mc.answer in "ABCD" and len(mc.options) == 4 and any(o.endswith(image_questions(scene, random.Random(0))[0].answer) for o in mc.options)


def test_video_questions_need_the_right_frames():
    video = random_video(random.Random(2), n_frames=16)
    spans = video.meta["spans"]
    for qa in video_questions(video, random.Random(0)):
        if qa.type == "distinct":
            assert qa.answer == str(len(spans))
        if qa.type == "order":
            first = min(video.meta["objects"].values(), key=lambda o: spans[o.uid][0] if o.shape in qa.question else 99)
            assert qa.answer == first.shape
    present = [{o.uid for o in f.objects} for f in video.frames]
    assert present[0] != present[-1] or len(set(map(frozenset, present))) > 1  # something appears or disappears


def test_write_dataset(tmp_path):
    pytest.importorskip("av")
    from tokensieve.engine.video import decode_video
    path = write_dataset(str(tmp_path), n_images=3, n_videos=2, seed=0, progress=False)
    rows = [json.loads(line) for line in open(path)]
    assert {"id", "question", "options", "answer", "type"} <= set(rows[0])
    assert (tmp_path / rows[0]["image"]).exists()
    vid = next(r for r in rows if "video" in r)
    decoded = decode_video({"path": str(tmp_path / vid["video"]), "nframes": vid["n_frames"]})
    assert decoded.indices == list(range(vid["n_frames"])) and len(decoded.frames) == vid["n_frames"]
    again = tmp_path / "again"
    write_dataset(str(again), n_images=3, n_videos=2, seed=0, progress=False)
    assert open(again / "dataset.jsonl").read() == open(path).read()


def test_write_dataset_typed_fraction_types_the_open_questions_only(tmp_path):
    """typed_fraction=1: every open question as people type it (never the world's spaced " ?": "circle?", or no
    question mark at all); multiple-choice questions keep the world's wording."""
    rows = [json.loads(line) for line in open(write_dataset(str(tmp_path), n_images=6, n_videos=0, seed=1,
                                                            mc_fraction=0.3, progress=False, typed_fraction=1.0))]
    open_rows = [r for r in rows if not r["options"]]
    assert open_rows and not any(" ?" in r["question"] for r in open_rows)
    assert all(" ?" in r["question"] for r in rows if r["options"])
    with pytest.raises(ValueError, match="typed_fraction must be in"):
        write_dataset(str(tmp_path / "bad"), n_images=1, typed_fraction=2, progress=False)


def test_cell_labels_name_what_each_token_cell_shows():
    from tokensieve.eval.shapeworld.world import SHAPES, cell_labels
    # on a 96 px image (8 x 8 cells of 12 px): a big red square centred on the lattice corner (x 2/8, y 3/8)
    # and a small blue circle centred in cell (row 6, col 5)
    scene = Scene([Obj("square", "red", "big", 2 / 8, 3 / 8), Obj("circle", "blue", "small", 5.5 / 8, 6.5 / 8)], size=96)
    lab = cell_labels(scene, 8)
    red, square = 1 + list(COLOURS).index("red"), 1 + SHAPES.index("square")
    blue, circle = 1 + list(COLOURS).index("blue"), 1 + SHAPES.index("circle")
    # the square spans 0.85 * 0.105 * 96 = 8.6 px either side of pixel (x 24, y 36): x 15-33, y 27-45 -> rows 2-3, cols 1-2
    expected_colour, expected_shape = np.zeros((8, 8), dtype=int), np.zeros((8, 8), dtype=int)
    expected_colour[2:4, 1:3], expected_shape[2:4, 1:3] = red, square
    expected_colour[6, 5], expected_shape[6, 5] = blue, circle
    assert (lab["colour"].reshape(8, 8) == expected_colour).all()
    assert (lab["shape"].reshape(8, 8) == expected_shape).all()
    centre = lab["centre"].reshape(8, 8)
    assert centre[3, 2] == 1 and centre[6, 5] == 1 and centre.sum() == 2


def test_random_scenes_sit_on_the_token_lattice():
    """Each object of a random 96 px scene covers exactly its own cells (1 small, 4 big) and no cell
    shows two objects, so each visual token of the tiny models is about one object or background."""
    from tokensieve.eval.shapeworld.world import object_map, random_scene
    rng = random.Random(3)
    for _ in range(30):
        scene = random_scene(rng, size=96)
        ids = object_map(scene)
        cells = ids.reshape(8, 12, 8, 12).transpose(0, 2, 1, 3).reshape(64, -1)
        for i, o in enumerate(scene.objects):
            covering = [k for k, block in enumerate(cells) if (block == i + 1).any()]
            assert len(covering) == (1 if o.size == "small" else 4), o
        assert all(len(set(block.tolist()) - {0}) <= 1 for block in cells)


def test_video_events_are_seen_by_evenly_sampled_frames():
    for seed in range(10):
        n = random.Random(seed).choice([16, 24, 32])
        video = random_video(random.Random(seed), n_frames=n)
        idx = [round(i * (n - 1) / 7) for i in range(8)]  # what the engine samples from a video file
        seg = n // 8
        for i, f in enumerate(idx):  # the sampled frame shows exactly what its segment shows
            assert {o.uid for o in video.frames[f].objects} == {o.uid for o in video.frames[i * seg].objects}
        names = [o.name for o in video.meta["objects"].values()]
        assert len(names) == len(set(names))
    with pytest.raises(ValueError, match="multiple of 8"):
        random_video(random.Random(0), n_frames=12)


def test_video_objects_stay_on_the_lattice_in_every_frame():
    """Moving objects bounce off the edges: in every frame each object lies inside the image and covers
    its cells (one for a small object, four for a big one) in the object map. An object that stepped off
    the left or top edge (x = -1/16: a truncating int() put it in column 0) was drawn nowhere, so 7% of
    videos asked about an object no frame showed."""
    from tokensieve.eval.shapeworld.world import object_map
    for seed in range(150):
        video = random_video(random.Random(seed), n_frames=8, size=96)  # 8 x 8 cells of 12 px
        for scene in video.frames:
            cells = object_map(scene).reshape(8, 12, 8, 12).transpose(0, 2, 1, 3).reshape(64, -1)
            for i, o in enumerate(scene.objects):
                assert 0 < o.x < 1 and 0 < o.y < 1, (seed, o)
                covering = [k for k, block in enumerate(cells) if (block == i + 1).any()]
                assert len(covering) == (1 if o.size == "small" else 4), (seed, o)


def test_question_refs_name_the_objects_the_answer_is_read_from():
    from tokensieve.eval.shapeworld.world import image_questions, random_scene
    rng = random.Random(11)
    for _ in range(100):
        scene = random_scene(rng, size=96)
        by_uid = {o.uid: o for o in scene.objects}
        for qa in image_questions(scene, rng):
            refs = [by_uid[u] for u in qa.refs]
            if qa.type == "colour":
                assert [o.colour for o in refs] == [qa.answer] and refs[0].shape in qa.question
            elif qa.type == "shape":
                assert [o.shape for o in refs] == [qa.answer] and refs[0].colour in qa.question
            elif qa.type == "count":
                assert len(refs) == int(qa.answer)
            elif qa.type == "exist":
                assert (qa.answer == "yes") == bool(refs) and all(o.name in qa.question for o in refs)
            else:
                assert len(refs) == 1 and refs[0].name in qa.question


def test_free_layout_scenes_anywhere():
    """Issue 29 item 3's split: continuous centres, sizes from half a token cell to about three, varied
    backgrounds in greys far from every object colour, and position questions only where the object lies
    wholly on one side."""
    import math
    import random

    import numpy as np

    from tokensieve.eval.shapeworld import world

    rng = random.Random(3)
    kinds, off_lattice, scales = set(), 0, []
    for _ in range(60):
        scene = world.random_scene(rng, size=128, layout="free")
        kinds.add(scene.background)
        ids = world.object_map(scene)
        for i, o in enumerate(scene.objects):
            e = world.SIZES[o.size] * o.scale
            scales.append(o.scale)
            assert e <= o.x <= 1 - e and e <= o.y <= 1 - e  # inside the image
            assert (ids == i + 1).sum() > 0.5 * (e * 128) ** 2  # drawn, and not hidden under another object
            on_lattice = any(abs(v * 8 - round(v * 8 * 2) / 2) < 1e-9 for v in (o.x, o.y))
            off_lattice += not on_lattice
        bg = np.asarray(world.background(128, scene.background_seed, scene.background)).reshape(-1, 3).astype(float)
        for rgb in world.COLOURS.values() if scene.background != "noise" else ():  # the new kinds (noise: the lattice's)
            assert np.linalg.norm(bg - np.array(rgb), axis=1).min() > 60
        for qa in world.image_questions(scene, rng):
            if qa.type == "position":
                o = next(o for o in scene.objects if o.uid == qa.refs[0])
                e = world.SIZES[o.size] * o.scale
                assert abs(o.x - 0.5) > e and abs(o.y - 0.5) > e
    assert kinds == set(world.BACKGROUNDS)
    assert off_lattice > 100 and min(scales) < 0.7 and max(scales) > 1.7
    assert world.SIZES["small"] * min(scales) * 8 < 0.5 and world.SIZES["big"] * max(scales) * 2 * 8 > 2.5  # cells
    with pytest.raises(ValueError, match="layout must be"):
        world.random_scene(rng, layout="grid")


def test_training_examples_mix_free_scenes_only_when_asked():
    import random

    from tokensieve.eval.shapeworld import train_tiny, world

    plain = train_tiny.sample_examples(random.Random(1), 20, video=False)
    again = train_tiny.sample_examples(random.Random(1), 20, video=False, free_fraction=0.0)
    assert [e["qas"][0].question for e in plain] == [e["qas"][0].question for e in again]  # no extra draws
    assert all(o.scale == 1.0 for e in plain for s in e["scenes"] for o in s.objects)
    mixed = train_tiny.sample_examples(random.Random(1), 40, video=False, free_fraction=0.5)
    free = [any(o.scale != 1.0 for o in e["scenes"][0].objects) or e["scenes"][0].background != "noise" for e in mixed]
    assert 8 < sum(free) < 32
    assert all(isinstance(e["scenes"][0], world.Scene) for e in mixed)


def test_free_layout_videos_drift_anywhere_with_the_lattice_videos_events():
    """Issue 29 item 3, videos: objects anywhere, drifting less than a token cell per segment, inside the image
    and never overlapping beyond touching in any frame; events only at segment boundaries (so 8 evenly sampled
    frames see them all) and the questions' answers follow the spans."""
    import math

    from tokensieve.eval.shapeworld import world

    kinds, drift = set(), []
    for seed in range(20):
        n = random.Random(seed).choice([8, 16, 32])
        video = world.random_video(random.Random(seed), n_frames=n, size=96, layout="free")
        seg, spans = n // 8, video.meta["spans"]
        kinds.add(video.frames[0].background)
        names = [o.name for o in video.meta["objects"].values()]
        assert len(names) == len(set(names))
        last = {}
        for f, frame in enumerate(video.frames):
            assert {o.uid for o in frame.objects} == {u for u, (a, b) in spans.items() if a <= f < b}
            assert {o.uid for o in frame.objects} == {o.uid for o in video.frames[f // seg * seg].objects}
            for o in frame.objects:
                e = world.SIZES[o.size] * o.scale
                assert e - 1e-9 <= o.x <= 1 - e + 1e-9 and e - 1e-9 <= o.y <= 1 - e + 1e-9
                if o.uid in last:
                    drift.append(math.hypot(o.x - last[o.uid][0], o.y - last[o.uid][1]))
                last[o.uid] = (o.x, o.y)
            for i, a in enumerate(frame.objects):
                for b in frame.objects[i + 1:]:
                    ea, eb = world.SIZES[a.size] * a.scale, world.SIZES[b.size] * b.scale
                    assert math.hypot(a.x - b.x, a.y - b.y) >= ea + eb
        for qa in world.video_questions(video, random.Random(seed)):
            if qa.type == "distinct":
                assert qa.answer == str(len(spans))
    assert max(drift) < 1 / 8 and sum(d > 0 for d in drift) > 20  # they move, by less than one cell a segment
    assert len(kinds) >= 3
    with pytest.raises(ValueError, match="layout must be"):
        world.random_video(random.Random(0), n_frames=8, layout="grid")


def test_a_quota_plan_keeps_every_key_of_its_other_stages():
    """The world's rater settings join a quota stage; the other stages keep what the plan said (``positions=``,
    a keep=auto rule, a layer), so the plan that runs is the plan that was asked for."""
    from tokensieve.engine.plan import Plan
    from tokensieve.eval.shapeworld.report import QUOTA_WORLD, request_plan

    asked = "quota:where=frames,keep=4;divprune:keep=auto,tau=0.3,max=0.5,positions=original;fastv:layer=2,keep=0.5"
    runs = Plan.parse(request_plan(asked, "is there a red circle?"))
    want = Plan.parse(asked)
    assert runs.stages[1:] == want.stages[1:] and runs.positions == "original"
    assert all(runs.stages[0].options[k] == v for k, v in QUOTA_WORLD.items() if k in runs.stages[0].options)

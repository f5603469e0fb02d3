"""A small synthetic world of shapes: images, videos and one-word questions about them.

Deterministic for a seed, and scenes can be given explicitly so that tests build exactly the
scene they need:

    scene = Scene([Obj("circle", "red", "big", 0.3, 0.4), Obj("square", "blue", "small", 0.7, 0.7)])
    image = render(scene)                       # PIL image, textured noisy background
    qa = image_questions(scene, random.Random(0))

    video = Video([scene_a, scene_b, ...])      # one Scene per frame; objects keep an ``uid``
    qa = video_questions(video, random.Random(0))

Files on disk (JSONL + PNG + lossless MP4): ``dataset.write_dataset``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 210, 40),
           "orange": (245, 140, 25), "purple": (150, 60, 190), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle", "star", "cross")
LATTICE = 8  # random scenes sit on a LATTICE x LATTICE grid of cells: the tiny models' visual-token raster
SIZES = {"small": 0.05, "big": 0.105}  # half-extent as a fraction of the image side: 1 cell / 2 x 2 cells
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of the width
    y: float  # centre, fraction of the height
    uid: int = 0  # identity across video frames
    scale: float = 1.0  # extent = SIZES[size] * scale (the lattice scenes: 1; ``layout="free"``: 0.6 .. 1.8)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    objects: list[Obj]
    size: int = 128
    background_seed: int = 0
    background: str = "noise"  # one of BACKGROUNDS


@dataclass
class Video:
    frames: list[Scene]
    meta: dict = field(default_factory=dict)


# ---- rendering ---------------------------------------------------------------------------------

BACKGROUNDS = ("noise", "flat", "gradient", "stripes")


def background(size: int, seed: int, kind: str = "noise") -> np.ndarray:
    """[size, size, 3] uint8 in muted greys (70..160, never an object colour): "noise" (smooth colour blobs
    plus pixel noise, the lattice scenes'), "flat", "gradient" (between two tones, any direction) or "stripes"."""
    rng = np.random.RandomState(seed)
    if kind == "noise":
        coarse = rng.rand(6, 6, 3)
        img = np.array(Image.fromarray((coarse * 255).astype("uint8")).resize((size, size), Image.BICUBIC), dtype=float)
        img = 70 + 0.35 * img + rng.normal(0, 12, (size, size, 3))
        return np.clip(img, 0, 255).astype("uint8")
    a, b = (rng.uniform(70, 160) + rng.uniform(-15, 15, 3) for _ in range(2))  # greys with a faint tint
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.rand() * 2 * np.pi
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    if kind == "flat":
        t = np.zeros_like(t)
    elif kind == "gradient":
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    elif kind == "stripes":
        t = (np.floor(t * rng.randint(3, 12) * 2) % 2)
    else:
        raise ValueError(f"unknown background {kind!r}; one of {BACKGROUNDS}")
    return (a + (b - a) * t[..., None]).clip(0, 255).astype("uint8")


def extent(o: "Obj") -> float:
    """Half the object's side, as a fraction of the image side."""
    return SIZES[o.size] * o.scale


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                 cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
    t = r * 0.38  # cross
    return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
            (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]


def _draw(draw: ImageDraw.ImageDraw, o: Obj, s: int, fill) -> None:
    cx, cy, r = o.x * s, o.y * s, extent(o) * s
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    else:
        draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)


def render(scene: Scene) -> Image.Image:
    img = Image.fromarray(background(scene.size, scene.background_seed, scene.background))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, scene.size, COLOURS[o.colour])
    return img


def object_map(scene: Scene) -> np.ndarray:
    """Which object each pixel shows: [size, size] uint8, 0 = background, i + 1 = scene.objects[i]."""
    img = Image.new("L", (scene.size, scene.size), 0)
    draw = ImageDraw.Draw(img)
    for i, o in enumerate(scene.objects):
        _draw(draw, o, scene.size, i + 1)
    return np.asarray(img)


def _cell_blocks(scene: Scene, grid: int) -> np.ndarray:
    """object_map cut into the cells of a ``grid`` x ``grid`` raster: [grid * grid, pixels per cell], row-major."""
    ids = object_map(scene)
    cell = scene.size // grid
    return ids[: grid * cell, : grid * cell].reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, -1)


def cell_labels(scene: Scene, grid: int, min_cover: float = 0.1) -> dict[str, np.ndarray]:
    """What each cell of a ``grid`` x ``grid`` raster (the visual tokens' layout) shows.

    Returns ``colour`` / ``shape`` [grid * grid] int64 (0 = background, else 1 + index into COLOURS /
    SHAPES; the object covering most of the cell, when it covers at least ``min_cover`` of it) and
    ``centre`` [grid * grid] (1 where an object's centre falls). Row-major, like the tokens.
    """
    blocks = _cell_blocks(scene, grid)
    colour, shape, centre = (np.zeros(grid * grid, dtype=np.int64) for _ in range(3))
    names = list(COLOURS)
    for k, block in enumerate(blocks):
        counts = np.bincount(block, minlength=len(scene.objects) + 1)
        counts[0] = 0
        if counts.max() >= min_cover * block.size:
            o = scene.objects[counts.argmax() - 1]
            colour[k], shape[k] = 1 + names.index(o.colour), 1 + SHAPES.index(o.shape)
    for o in scene.objects:
        centre[centre_cell(o, grid)] = 1
    return {"colour": colour, "shape": shape, "centre": centre}


def centre_cell(o: Obj, grid: int) -> int:
    """The row-major cell of a ``grid`` x ``grid`` raster that the object's centre falls in."""
    return min(int(o.y * grid), grid - 1) * grid + min(int(o.x * grid), grid - 1)


def cell_cover(scene: Scene, grid: int) -> np.ndarray:
    """[n_objects, grid * grid] the share of each cell (row-major) that each object shows in (0..1)."""
    blocks = _cell_blocks(scene, grid)
    return np.stack([(blocks == i + 1).mean(1) for i in range(len(scene.objects))]) if scene.objects \
        else np.zeros((0, grid * grid))


def object_cells(scene: Scene, grid: int, min_cover: float = 0.1) -> dict[int, list[int]]:
    """uid -> the cells (row-major indices of a ``grid`` x ``grid`` raster) the object covers by at
    least ``min_cover``: the visual tokens a question about it should read."""
    blocks = _cell_blocks(scene, grid)
    return {o.uid: [k for k, block in enumerate(blocks) if (block == i + 1).mean() >= min_cover]
            for i, o in enumerate(scene.objects)}


# ---- random scenes -----------------------------------------------------------------------------

def _cells(size: str, x: float, y: float) -> set[tuple[int, int]]:
    """The lattice cells (row, col) an object of ``size`` centred at (x, y) occupies."""
    if size == "small":
        return {(math.floor(y * LATTICE), math.floor(x * LATTICE))}  # (floor: a step off the left edge is -1)
    r, c = round(y * LATTICE) - 1, round(x * LATTICE) - 1
    return {(r + i, c + j) for i in (0, 1) for j in (0, 1)}


def _free(cells: set[tuple[int, int]], objs: list[Obj]) -> bool:
    """No cell of ``cells`` is occupied by or next to (8-neighbourhood) a cell of ``objs``."""
    taken = set().union(*(_cells(o.size, o.x, o.y) for o in objs)) if objs else set()
    return not any((r + i, c + j) in taken for r, c in cells for i in (-1, 0, 1) for j in (-1, 0, 1))


def _place(rng: random.Random, objs: list[Obj], size: str) -> tuple[float, float] | None:
    """A free lattice position: a small object fills one cell (centre at the cell's centre), a big one
    2 x 2 cells (centre on a lattice corner); objects never touch, so every cell shows at most one."""
    for _ in range(200):
        if size == "small":
            x, y = (rng.randrange(LATTICE) + 0.5) / LATTICE, (rng.randrange(LATTICE) + 0.5) / LATTICE
        else:
            x, y = rng.randrange(1, LATTICE) / LATTICE, rng.randrange(1, LATTICE) / LATTICE
        if _free(_cells(size, x, y), objs):
            return x, y
    return None


def random_objects(rng: random.Random, n: int, uid0: int = 0, distinct_names: bool = False) -> list[Obj]:
    objs: list[Obj] = []
    while len(objs) < n:
        size = rng.choice(list(SIZES))
        pos = _place(rng, objs, size)
        if pos is None:
            break
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        while distinct_names and any(o.name == f"{colour} {shape}" for o in objs):
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        objs.append(Obj(shape, colour, size, *pos, uid=uid0 + len(objs)))
    return objs


def random_scene(rng: random.Random, n_min: int = 1, n_max: int = 8, size: int = 128, layout: str = "lattice") -> Scene:
    """A scene of n_min..n_max objects: on the token lattice (``layout="lattice"``, the training scenes), or
    anywhere (``"free"``: continuous centres, sizes from half a token cell to about three, objects may
    touch, and any of BACKGROUNDS)."""
    if layout == "lattice":
        return Scene(random_objects(rng, rng.randint(n_min, n_max)), size=size, background_seed=rng.randrange(2**31))
    if layout != "free":
        raise ValueError(f"layout must be 'lattice' or 'free', got {layout!r}")
    objs = free_objects(rng, rng.randint(n_min, n_max))
    return Scene(objs, size=size, background_seed=rng.randrange(2**31), background=rng.choice(BACKGROUNDS))


def free_objects(rng: random.Random, n: int, distinct_names: bool = False) -> list[Obj]:
    """Up to n objects at continuous positions and scales, no two overlapping beyond touching (bounding discs)."""
    objs: list[Obj] = []
    for _ in range(50 * n):
        if len(objs) == n:
            break
        o = Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), 0.0, 0.0, uid=len(objs),
                scale=rng.uniform(0.6, 1.8))
        e = extent(o)
        o = replace(o, x=rng.uniform(e, 1 - e), y=rng.uniform(e, 1 - e))
        if _apart(o, objs) and not (distinct_names and any(p.name == o.name for p in objs)):
            objs.append(o)
    return objs


def _apart(o: Obj, objs: list[Obj]) -> bool:
    """``o`` overlaps none of ``objs`` beyond touching (bounding discs, 15 % margin)."""
    return all(math.hypot(o.x - p.x, o.y - p.y) >= (extent(o) + extent(p)) * 1.15 for p in objs if p.uid != o.uid)


# ---- image questions ---------------------------------------------------------------------------

@dataclass
class QA:
    question: str
    answer: str
    type: str
    options: list[str] = field(default_factory=list)
    refs: tuple[int, ...] = ()  # uids of the objects the answer is read from (random scenes: distinct uids)


def _unique(objs, key):
    values = [key(o) for o in objs]
    return [o for o in objs if values.count(key(o)) == 1]


def absent_name(objs: list[Obj], rng: random.Random) -> str:
    """A random "colour shape" that none of ``objs`` is."""
    names = {o.name for o in objs}
    return rng.choice([f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in names])


def quadrant(o: Obj) -> str:
    return f"{'top' if o.y < 0.5 else 'bottom'}-{'left' if o.x < 0.5 else 'right'}"


def image_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """Every question type the scene supports, with one-word answers."""
    objs, out = scene.objects, []
    by_shape, by_colour = _unique(objs, lambda o: o.shape), _unique(objs, lambda o: o.colour)
    if by_shape:
        o = rng.choice(by_shape)
        out.append(QA(f"what colour is the {o.shape} ?", o.colour, "colour", refs=(o.uid,)))
    if by_colour:
        o = rng.choice(by_colour)
        out.append(QA(f"what shape is the {o.colour} object ?", o.shape, "shape", refs=(o.uid,)))
    c = rng.choice(list(COLOURS))
    out.append(QA(f"how many {c} objects are there ?", str(sum(o.colour == c for o in objs)), "count",
                  refs=tuple(o.uid for o in objs if o.colour == c)))
    s = rng.choice(SHAPES)
    out.append(QA(f"how many {s} objects are there ?", str(sum(o.shape == s for o in objs)), "count",
                  refs=tuple(o.uid for o in objs if o.shape == s)))
    present = rng.random() < 0.5 and objs
    if present:
        o = rng.choice(objs)
        out.append(QA(f"is there a {o.colour} {o.shape} ?", "yes", "exist", refs=(o.uid,)))
    else:
        out.append(QA(f"is there a {absent_name(objs, rng)} ?", "no", "exist"))
    unique_names = _unique(objs, lambda o: o.name)
    clear = [o for o in unique_names if min(abs(o.x - 0.5), abs(o.y - 0.5)) > max(0.03, extent(o))]  # one side
    if clear:
        o = rng.choice(clear)
        kind = rng.choice(["horizontal", "vertical", "quadrant"])
        if kind == "horizontal":
            out.append(QA(f"is the {o.name} on the left or right ?", "left" if o.x < 0.5 else "right", "position",
                          refs=(o.uid,)))
        elif kind == "vertical":
            out.append(QA(f"is the {o.name} at the top or bottom ?", "top" if o.y < 0.5 else "bottom", "position",
                          refs=(o.uid,)))
        else:
            out.append(QA(f"which quadrant is the {o.name} in ?", quadrant(o), "position", refs=(o.uid,)))
    return out


def multiple_choice(qa: QA, rng: random.Random) -> QA:
    """The same question with options A-D (the answer among them) and a letter as answer."""
    pools = {"colour": list(COLOURS), "shape": list(SHAPES), "count": [str(i) for i in range(10)],
             "exist": ["yes", "no"], "position": ["left", "right", "top", "bottom", *QUADRANTS]}
    pool = next((p for p in pools.values() if qa.answer in p), pools["count"])
    distractors = rng.sample([p for p in pool if p != qa.answer], min(3, len(pool) - 1))
    opts = distractors + [qa.answer]
    rng.shuffle(opts)
    letters = "ABCD"[: len(opts)]
    return QA(qa.question + " " + " ".join(f"{l} . {o}" for l, o in zip(letters, opts)),
              letters[opts.index(qa.answer)], qa.type, [f"{l}. {o}" for l, o in zip(letters, opts)], qa.refs)


# ---- videos ------------------------------------------------------------------------------------

SEGMENTS = 8  # a video's events happen at segment boundaries


def random_video(rng: random.Random, n_frames: int | None = None, size: int = 128, layout: str = "lattice") -> Video:
    """Objects (distinct names) appear, disappear and move on the lattice; ``meta`` records each one's
    first and last frame. ``layout="free"``: objects anywhere (``free_objects``: continuous positions and
    sizes, touching allowed) on any of BACKGROUNDS, moving up to about half a token cell per segment.

    The video is cut into SEGMENTS equal segments and objects appear / disappear only at segment
    boundaries (and move one cell at a boundary), so any SEGMENTS evenly spaced frames (what the engine
    samples) see every event.
    """
    n_frames = n_frames or rng.choice([8, 16, 24, 32])
    if n_frames % SEGMENTS:
        raise ValueError(f"n_frames must be a multiple of {SEGMENTS}, got {n_frames}")
    if layout not in ("lattice", "free"):
        raise ValueError(f"layout must be 'lattice' or 'free', got {layout!r}")
    seg = n_frames // SEGMENTS
    if layout == "free":
        return _free_video(rng, n_frames, size, seg)
    pool = random_objects(rng, rng.randint(2, 5), distinct_names=True)
    spans = _spans(rng, pool, seg)
    at = [pool]  # positions per segment: each object steps one lattice cell per segment when it can
    step = {o.uid: (rng.choice((-1, 0, 1)) / LATTICE, rng.choice((-1, 0, 1)) / LATTICE) for o in pool}
    for _ in range(1, SEGMENTS):
        moved = list(at[-1])
        for i, o in enumerate(moved):
            dx, dy = step[o.uid]
            cand = replace(o, x=o.x + dx, y=o.y + dy)
            inside = all(0 <= r < LATTICE and 0 <= c < LATTICE for r, c in _cells(o.size, cand.x, cand.y))
            if inside and _free(_cells(o.size, cand.x, cand.y), moved[:i] + moved[i + 1:]):
                moved[i] = cand
            else:
                step[o.uid] = (-dx, -dy)  # bounce
        at.append(moved)
    return _video(pool, spans, at, n_frames, size, rng.randrange(2**31))


def _free_video(rng: random.Random, n_frames: int, size: int, seg: int) -> Video:
    """``random_video``'s events (``_spans``) with ``free_objects`` that drift, bouncing off the edges and
    staying where a step would overlap another object."""
    pool = free_objects(rng, rng.randint(2, 5), distinct_names=True)
    spans = _spans(rng, pool, seg)
    at, step = [pool], {o.uid: (rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06)) for o in pool}
    for _ in range(1, SEGMENTS):
        moved = list(at[-1])
        for i, o in enumerate(moved):
            dx, dy = step[o.uid]
            cand = replace(o, x=o.x + dx, y=o.y + dy)
            e = extent(o)
            if e <= cand.x <= 1 - e and e <= cand.y <= 1 - e and _apart(cand, moved):
                moved[i] = cand
            else:
                step[o.uid] = (-dx, -dy)
        at.append(moved)
    bg, kind = rng.randrange(2**31), rng.choice(BACKGROUNDS)
    return _video(pool, spans, at, n_frames, size, bg, kind)


def _video(pool: list[Obj], spans: dict, at: list[list[Obj]], n_frames: int, size: int, background_seed: int,
           background: str = "noise") -> Video:
    """The frames of a video whose objects sit at ``at[segment]`` and show during their ``spans``."""
    seg = n_frames // SEGMENTS
    frames = [Scene([o for o in at[f // seg] if spans[o.uid][0] <= f < spans[o.uid][1]], size=size,
                    background_seed=background_seed, background=background) for f in range(n_frames)]
    return Video(frames, meta={"spans": spans, "objects": {o.uid: o for o in pool}})


def _spans(rng: random.Random, pool: list[Obj], seg: int) -> dict[int, tuple[int, int]]:
    """Each object's [first, last) frame: the first object from frame 0, the others from distinct later
    segments, each until a random later segment boundary (shuffles ``pool`` in place)."""
    starts = [0] + sorted(rng.sample(range(1, SEGMENTS - 1), len(pool) - 1))
    rng.shuffle(pool)
    return {o.uid: (s * seg, rng.randint(s + 1, SEGMENTS) * seg) for o, s in zip(pool, starts)}


def video_questions(video: Video, rng: random.Random) -> list[QA]:
    spans, objs = video.meta["spans"], video.meta["objects"]
    order = sorted(objs.values(), key=lambda o: spans[o.uid][0])
    out = []
    late = [o for o in order if spans[o.uid][0] > 0 and sum(p.name == o.name for p in order) == 1]
    if late:
        o = rng.choice(late)
        out.append(QA(f"what colour is the {o.shape} that appeared ?", o.colour, "appeared", refs=(o.uid,))
                    if sum(p.shape == o.shape for p in order) == 1 else
                    QA(f"what shape is the {o.colour} object that appeared ?", o.shape, "appeared", refs=(o.uid,)))
    firsts = [(a, b) for a in order for b in order if spans[a.uid][0] < spans[b.uid][0] and a.shape != b.shape]
    if firsts:
        a, b = rng.choice(firsts)
        pair = [a.shape, b.shape]
        rng.shuffle(pair)
        out.append(QA(f"which shape came first , {pair[0]} or {pair[1]} ?", a.shape, "order", refs=(a.uid, b.uid)))
    if rng.random() < 0.5:
        o = rng.choice(order)
        out.append(QA(f"was there ever a {o.colour} {o.shape} ?", "yes", "ever", refs=(o.uid,)))
    else:
        out.append(QA(f"was there ever a {absent_name(order, rng)} ?", "no", "ever"))
    out.append(QA("how many distinct objects appeared ?", str(len(objs)), "distinct", refs=tuple(objs)))
    return out

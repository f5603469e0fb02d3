"""The demo: its handlers, the app through gradio_client (/compare on a bundled image and video, four clients
at once, bad uploads, every picture downloaded whole), and comparisons in a real headless Chromium. The engine
run directly on the same inputs is the reference."""
import hashlib
import io
import os
import shutil
import statistics
import threading

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

import tokensieve  # noqa: E402
from tokensieve.demos import compare as cmp  # noqa: E402
from tokensieve.demos.app import build, respond  # noqa: E402
from tokensieve.demos.overlay import sheet  # noqa: E402

IMAGE, IMAGE_Q = cmp.example_files()[0]
VIDEO, VIDEO_Q = cmp.example_files()[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def engine():
    e = tokensieve.load()
    yield e
    e.close()


@pytest.fixture(scope="module")
def app(engine):
    demo = build(engine)
    demo.queue(max_size=16, default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()


def _direct(engine, media, question, plans):
    inputs = {"video": {"path": media, "nframes": 8}} if media.endswith(".mp4") else {"images": [media]}
    return [engine.generate(question, plan=p or None, max_new_tokens=16, **inputs).text for p in plans]


def _tiles(picture: Image.Image, side: int = 40) -> list:
    """The pictures on a sheet: its non-white regions at least ``side`` px each way (captions are smaller),
    as (rows, cols) slices, row by row."""
    from scipy import ndimage

    labels, _ = ndimage.label(np.asarray(picture.convert("RGB")).min(axis=2) < 200)
    boxes = [b for b in ndimage.find_objects(labels) if min(b[0].stop - b[0].start, b[1].stop - b[1].start) >= side]
    return sorted(boxes, key=lambda b: (b[0].start, b[1].start))


def _blocks(picture: Image.Image) -> np.ndarray:
    """[8, 8, 3] mean colour of each cell of an 8 x 8 grid over the picture."""
    cells = np.asarray(picture.convert("RGB").resize((64, 64), Image.BILINEAR), float)
    return cells.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))


# ---- handlers ------------------------------------------------------------------------------------------
def test_budgets_and_plans():
    assert cmp.parse_budgets("1, 0.5,0.25") == [1.0, 0.5, 0.25]
    for bad in ("", "a,b", "0.5,2", "0", "1,0.5,0.25,0.11,0.05"):
        with pytest.raises(cmp.DemoError, match="budgets"):
            cmp.parse_budgets(bad)
    cols = cmp.plans_for("divprune", [1.0, 0.25])
    assert [c.plan for c in cols] == ["", "divprune:where=pre_llm,keep=0.25"] and cols[0].label == "all tokens"
    assert cmp.plans_for("fastv:layer=1,keep={keep}", [0.5])[0].plan == "fastv:where=llm,layer=1,keep=0.5"
    assert cmp.plans_for("fastv", [0.5])[0].plan == "fastv:where=llm,layer=2,keep=0.5"
    with pytest.raises(cmp.DemoError, match="choose a pruner"):
        cmp.plans_for("nosuch", [0.5])
    with pytest.raises(tokensieve.PlanError, match="unknown pruner"):
        cmp.plans_for("nosuch:keep={keep}", [0.5])


def test_an_auto_column_lets_each_request_choose_its_budget(engine):
    """``auto`` in the budgets: the importance-mass rule for a pruner with scores, the redundancy rule otherwise;
    the column answers as that plan does directly, and its stats say the budget it got."""
    assert cmp.parse_budgets("1,auto") == [1.0, "auto"]
    fastv, divprune = cmp.plans_for("fastv", ["auto"])[0], cmp.plans_for("divprune", ["auto"])[0]
    assert tokensieve.Plan.parse(fastv.plan) == tokensieve.Plan.parse("fastv:layer=2,keep=auto,mass=0.9")
    assert tokensieve.Plan.parse(divprune.plan) == tokensieve.Plan.parse("divprune:keep=auto,tau=0.2")
    assert divprune.label == "auto (tau 0.2)"
    columns = list(cmp.compare(engine, IMAGE, IMAGE_Q, "divprune", "1,auto", timing_runs=1))[-1]
    assert [c.answer for c in columns] == _direct(engine, IMAGE, IMAGE_Q, [c.plan for c in columns])
    (budget,) = columns[1].result.stats["budgets"]
    assert budget["rule"] == "tau" and budget["kept"] == columns[1].result.stats["kept_tokens"] < 64


def test_media_is_checked(tmp_path):
    assert cmp.load_media(IMAGE)[0] == "image"
    kind, video = cmp.load_media(VIDEO)
    assert kind == "video" and len(video.frames) == 8
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(b"\x00" * 64)
    for path, words in ((None, "upload an image or a video"), (str(tmp_path / "gone.png"), "gone"),
                        (str(text), "not an image or a video"), (str(broken), "cannot use this video")):
        with pytest.raises(cmp.DemoError, match=words):
            cmp.load_media(path)


def test_compare_streams_columns_that_match_the_engine(engine):
    updates = list(cmp.compare(engine, IMAGE, IMAGE_Q, "divprune", "1,0.5,0.25,0.11", timing_runs=1))
    columns = updates[-1]
    assert len(updates) > len(columns) + 1  # the page is updated while answers stream, not once at the end
    plans = [c.plan for c in columns]
    assert [c.answer for c in columns] == _direct(engine, IMAGE, IMAGE_Q, plans)
    assert [c.result.stats["kept_tokens"] for c in columns] == [64, 32, 16, 7]
    for c in columns:
        assert len(c.pictures) == 1 and c.pictures[0][0].size[0] > 0 and "tokens kept" in c.pictures[0][1]
        assert set(c.summary()) == set(cmp.JSON_FIELDS)
    assert cmp.chart(columns) is not None


def test_compare_on_a_video_draws_each_frame(engine):
    columns = list(cmp.compare(engine, VIDEO, VIDEO_Q, "uniform", "1,0.25", timing_runs=1))[-1]
    assert [c.answer for c in columns] == _direct(engine, VIDEO, VIDEO_Q, [c.plan for c in columns])
    full, pruned = columns
    assert len(full.pictures) == 8 and "frame 0" in full.pictures[0][1]
    shares = [int(cap.split("(")[1].split("%")[0]) for _, cap in pruned.pictures]
    assert 95 <= sum(shares) <= 105  # each frame's share of the kept total


def test_bad_requests_are_refused_before_any_work(engine):
    for media, q, choice, budgets, words in ((IMAGE, "  ", "divprune", "1", "type a question"),
                                             (IMAGE, IMAGE_Q, "divprune", "2", "budgets"),
                                             (IMAGE, IMAGE_Q, "fastv:layer=9,keep={keep}", "0.5", "LLM layer must be"),
                                             (None, IMAGE_Q, "divprune", "1", "upload")):
        with pytest.raises(tokensieve.TokenSieveError, match=words):
            next(cmp.compare(engine, media, q, choice, budgets))


class ScriptedTimes:
    """The engine with each run's prefill / decode seconds replaced: a plan's streamed (answering) run takes
    COLD, like a first run paying one-off costs; its later runs take WARM's values in turn."""
    COLD, WARM = 0.078, (0.030, 0.020, 0.024)

    def __init__(self, engine):
        self.engine, self.runs = engine, {}

    def stream(self, *args, **kwargs):
        pieces = self.engine.stream(*args, **kwargs)  # checked now, as the engine does
        return (p if isinstance(p, str) else self._set(p, self.COLD) for p in pieces)

    def generate(self, *args, **kwargs):
        n = self.runs[kwargs.get("plan")] = self.runs.get(kwargs.get("plan"), -1) + 1
        return self._set(self.engine.generate(*args, **kwargs), self.WARM[n % len(self.WARM)])

    @staticmethod
    def _set(result, seconds):
        result.stats.update(prefill_s=seconds, decode_s=seconds / 4)
        return result


def test_times_are_medians_of_the_runs_after_the_answering_one(engine):
    columns = list(cmp.compare(ScriptedTimes(engine), IMAGE, IMAGE_Q, "divprune", "1,0.25", timing_runs=3))[-1]
    median = statistics.median(ScriptedTimes.WARM)
    for row in (c.summary() for c in columns):  # not the streamed run's 78 ms: "pruning is slower"
        assert (row["prefill_s"], row["decode_s"], row["timing_runs"]) == (median, median / 4, 3)


def test_sheet_shows_every_picture_in_order():
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200)]
    got = sheet([(Image.new("RGB", (40, 40), c), f"picture {i}: {i} kept (20% of the budget)")
                 for i, c in enumerate(colours)], per_row=2, tile=100)
    boxes = _tiles(got)
    assert len(boxes) == len(colours)
    for box, colour in zip(boxes, colours):  # row by row, each whole (100 px) and its own colour
        crop = np.asarray(got)[box]
        assert crop.shape[:2] == (100, 100) and np.abs(crop - colour).max() <= 2


def test_each_picture_is_a_file_written_once(engine, tmp_path):
    """Gradio serves a picture while later updates stream: one rewritten in place (the same name at every
    update) was cut off mid-download (h11 "Too much data for declared Content-Length")."""
    seen = {}
    for _ in range(2):  # a second run writes new files, never the first run's
        for out in respond(engine, str(tmp_path), IMAGE, IMAGE_Q, "uniform", "1,0.25", timing_runs=1):
            for value in out[3:4 * cmp.MAX_COLUMNS:4]:  # each slot's picture
                if value is None or isinstance(value, dict):  # none yet, or left as it is (gr.skip / hidden)
                    continue
                assert isinstance(value, str) and os.path.isfile(value), value
                with open(value, "rb") as f:
                    state = (os.stat(value).st_ino, os.stat(value).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
                assert seen.setdefault(value, state) == state
    assert len(seen) == 4  # two columns, two runs: a file each
    for path, state in seen.items():
        assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == state[:2]


def test_a_bad_plan_gives_one_message_and_leaves_the_page(engine, tmp_path):
    updates = respond(engine, str(tmp_path), IMAGE, IMAGE_Q, "fastv:layer=9,keep={keep}", "1,0.5")
    *others, status = next(updates)
    assert all(v == gr.skip() for v in others) and "LLM layer must be" in status
    with pytest.raises(gr.Error, match="LLM layer must be"):  # an API client still gets the error
        next(updates)


def test_words_the_model_never_learnt_are_named_once_above_the_columns(engine, tmp_path):
    import json
    import re

    from tokensieve.eval.shapeworld import shipped

    question = "How many shapes are there?"
    with open(os.path.join(shipped.path("tiny-llava"), "trained_words.json")) as f:
        known = set(json.load(f)["words"])
    unknown = [w for w in re.findall(r"[a-z]+", question.lower()) if w not in known]
    assert unknown == ["shapes"]  # the reference: the checkpoint's own word list
    *_, table, status = list(respond(engine, str(tmp_path), IMAGE, question, "divprune", "1,0.25", timing_runs=1))[-1]
    assert status.count("not understood") == 1 and "not understood: shapes" in status
    assert [row["unknown_words"] for row in table] == [unknown, unknown]
    *_, table, status = list(respond(engine, str(tmp_path), IMAGE, IMAGE_Q, "divprune", "1", timing_runs=1))[-1]
    assert "not understood" not in status and table[0]["unknown_words"] == []


# ---- the app -------------------------------------------------------------------------------------------
def _predict(url, media, question, choice="divprune", budgets="1,0.5,0.25,0.11"):
    from gradio_client import Client, handle_file

    return Client(url, verbose=False).predict(handle_file(media), question, choice, budgets, api_name="/compare")


def test_compare_endpoint_on_a_bundled_image_and_video(app, engine):
    for media, question in ((IMAGE, IMAGE_Q), (VIDEO, VIDEO_Q)):
        table = _predict(app, media, question)[-2]
        assert [set(row) for row in table] == [set(cmp.JSON_FIELDS)] * 4
        assert [row["answer"] for row in table] == _direct(engine, media, question, [r["plan"] for r in table])
        assert table[0]["kept_tokens"] == table[0]["visual_tokens"] > table[-1]["kept_tokens"]


def test_four_clients_at_once(app, engine):
    cases = [(IMAGE, IMAGE_Q), cmp.example_files()[1], (VIDEO, VIDEO_Q), (IMAGE, IMAGE_Q)]
    got = [None] * 4

    def ask(i):
        got[i] = [row["answer"] for row in _predict(app, *cases[i], budgets="1,0.25")[-2]]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for (media, question), answers in zip(cases, got):
        assert answers == _direct(engine, media, question, ["", "divprune:where=pre_llm,keep=0.25"])


def test_bad_uploads_show_a_message_and_the_app_keeps_serving(app, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    for args, words in (((IMAGE, "  "), "type a question"), ((str(broken), "what ?"), "cannot use this video"),
                        ((IMAGE, IMAGE_Q, "fastv:layer=9,keep={keep}"), "LLM layer must be")):
        with pytest.raises(Exception, match=words):
            _predict(app, *args)
    assert _predict(app, IMAGE, IMAGE_Q, budgets="1")[-2][0]["answer"]


def _image_urls(value):
    """Every served picture's URL in a /compare output (gradio_client, download_files=False)."""
    if isinstance(value, dict):
        if value.get("url") and str(value.get("path", "")).lower().endswith((".webp", ".png", ".jpg")):
            yield value["url"]
        for v in value.values():
            yield from _image_urls(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _image_urls(v)


def test_every_picture_of_a_video_comparison_downloads_whole(app):
    """Each picture of every streamed update fetched three times while the comparison goes on: each download
    complete (as long as its Content-Length) and a whole image."""
    import httpx
    from gradio_client import Client, handle_file

    job = Client(app, verbose=False, download_files=False).submit(
        handle_file(VIDEO), VIDEO_Q, "divprune", "1,0.5,0.25,0.11", api_name="/compare")
    urls, failed = set(), []
    with httpx.Client(timeout=60) as http:
        for out in job:
            for url in _image_urls(out):
                urls.add(url)
                for _ in range(3):
                    try:
                        r = http.get(url)
                        assert r.status_code == 200 and len(r.content) == int(r.headers["content-length"])
                        Image.open(io.BytesIO(r.content)).load()
                    except Exception as e:  # noqa: BLE001 -- every failure counted, reported at the end
                        failed.append(f"{url}: {e!r:.200}")
    assert job.status().success and len(urls) >= 4 and not failed, failed


# ---- a real browser ------------------------------------------------------------------------------------
def _finish(page, tokens: int):
    """Wait until the four columns show ``tokens`` visual tokens each and are timed."""
    from playwright.sync_api import expect

    for i in range(4):
        expect(page.locator(f"#stats-{i}")).to_contain_text(f"/ {tokens}", timeout=120_000)
        expect(page.locator(f"#stats-{i}")).to_contain_text("median of", timeout=120_000)
    expect(page.locator("#status")).to_have_text("", timeout=120_000)


def _shown_picture(page, i: int) -> Image.Image:
    """Column ``i``'s picture as the browser got it, once it is loaded and seen whole (not cut off)."""
    img = page.locator(f"#overlay-{i} img").first
    img.wait_for()
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(), timeout=60_000)
    shown = img.evaluate("el => [el.clientWidth, el.clientHeight, el.naturalWidth, el.naturalHeight]")
    assert shown[0] > 0 and abs(shown[1] / shown[0] - shown[3] / shown[2]) < 0.02, shown  # whole, not cropped
    return Image.open(io.BytesIO(page.request.get(img.get_attribute("src")).body()))


def _screenshot(page, path: str) -> None:
    """The page down to the chart (docs/demo.png: TOKENSIEVE_DEMO_SCREENSHOT=docs/demo.png), in 256 colours."""
    box = page.locator("#plot").bounding_box()
    page.screenshot(path=path, full_page=True, clip={"x": 0, "y": 0, "width": page.viewport_size["width"],
                                                     "height": box["y"] + box["height"] + 16})
    Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_a_comparison_in_headless_chromium(app, engine, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    from tokensieve.engine.video import decode_video

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(app)
        page.get_by_text("examples").first.wait_for()
        page.locator("table").get_by_text(IMAGE_Q).click()  # the first bundled example
        expect(page.get_by_label("question")).to_have_value(IMAGE_Q, timeout=30_000)
        page.get_by_role("button", name="compare").click()
        for i in range(4):
            expect(page.locator(f"#answer-{i}")).to_contain_text("Answer:", timeout=120_000)
            expect(page.locator(f"#stats-{i}")).to_contain_text("visual tokens kept", timeout=120_000)
            expect(page.locator(f"#overlay-{i} img").first).to_be_visible(timeout=120_000)
        _finish(page, 64)
        answers = [page.locator(f"#answer-{i}").inner_text() for i in range(4)]
        assert all("…" not in a.split("Answer:")[1] for a in answers)
        shot = os.environ.get("TOKENSIEVE_DEMO_SCREENSHOT", str(tmp_path / "demo.png"))
        _screenshot(page, shot)

        # the video: every frame of every column on its picture, in order, seen whole
        page.locator("table").get_by_text(VIDEO_Q).click()
        expect(page.get_by_label("question")).to_have_value(VIDEO_Q, timeout=30_000)
        page.get_by_role("button", name="compare").click()
        _finish(page, 512)
        frames = [_blocks(f) for f in decode_video({"path": VIDEO, "nframes": 8}).frames]
        for i in range(4):
            picture = _shown_picture(page, i)
            boxes = _tiles(picture)
            assert len(boxes) == len(frames), f"column {i} shows {len(boxes)} of {len(frames)} frames"
            if i == 0:  # all tokens kept: tile t is frame t (its twins in the clip aside), outlines apart
                for t, box in enumerate(boxes):
                    tile = _blocks(picture.crop((box[1].start, box[0].start, box[1].stop, box[0].stop)))
                    d = [np.abs(tile - f).mean(axis=2).max() for f in frames]
                    assert d[t] < 20 and d[t] <= min(d) + 1, (t, d)
        video_answers = [page.locator(f"#answer-{i}").inner_text() for i in range(4)]

        # a bad plan: one message above the columns, the video's results stay, no error badge on them
        plan = page.get_by_label("pruner, or a plan template with {keep}")
        plan.fill("fastv:layer=9,keep={keep}")
        plan.press("Enter")
        page.get_by_role("button", name="compare").click()
        expect(page.locator("#status")).to_contain_text("LLM layer must be", timeout=60_000)
        assert page.get_by_text("Error", exact=True).count() == 0
        assert [page.locator(f"#answer-{i}").inner_text() for i in range(4)] == video_answers
        browser.close()
    assert os.path.getsize(shot) > 10_000

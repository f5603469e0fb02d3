"""The demo: its handlers, the app through gradio_client (/compare on a bundled image and video, four clients
at once, bad uploads), and one comparison in a real headless Chromium. The engine run directly on the same
inputs is the reference."""
import os
import shutil
import threading

import pytest

gr = pytest.importorskip("gradio")

import tokensieve  # noqa: E402
from tokensieve.demos import compare as cmp  # noqa: E402
from tokensieve.demos.app import build  # noqa: E402

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
    updates = list(cmp.compare(engine, IMAGE, IMAGE_Q, "divprune", "1,0.5,0.25,0.11"))
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
    columns = list(cmp.compare(engine, VIDEO, VIDEO_Q, "uniform", "1,0.25"))[-1]
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


# ---- a real browser ------------------------------------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_a_comparison_in_headless_chromium(app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

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
        answers = [page.locator(f"#answer-{i}").inner_text() for i in range(4)]
        assert all("…" not in a.split("Answer:")[1] for a in answers)
        shot = os.environ.get("TOKENSIEVE_DEMO_SCREENSHOT", str(tmp_path / "demo.png"))
        page.screenshot(path=shot, full_page=True)
        browser.close()
    assert os.path.getsize(shot) > 10_000

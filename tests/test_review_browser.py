"""The review page in a real headless Chromium (Debian's, driven by Playwright).

Screenshots of the task screen and the progress page go to ``build/test-artifacts/`` (not
committed), with ``correction.json``: the keystrokes and seconds the scripted correction took.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from labeling.models import Review
from labeling.webapp import Settings, create_app
from tests.reviewdata import XSS, make_project

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"


@pytest.fixture()
def server(tmp_path: Path, corpus):
    import uvicorn

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium for the tests")
    url, queue = make_project(tmp_path, corpus)
    tokens = {name: queue.add_reviewer(name)[1] for name in ("ana", "ben")}
    tokens["boss"] = queue.add_reviewer("boss", role="admin")[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(Settings(db=url, project="demo", locales=["de-DE", "en-US", "es-ES", "fr-FR"]), queue)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "the review app did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", queue, tokens
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--autoplay-policy=no-user-gesture-required", "--no-sandbox"]
        )
        yield b
        b.close()


def sign_in(browser, base: str, token: str):
    # bypass_csp: the page must be safe by construction (textContent), not only by its CSP header;
    # it also lets Playwright evaluate its wait conditions
    page = browser.new_context(viewport={"width": 1100, "height": 900}, bypass_csp=True).new_page()
    page.goto(base + "/")
    page.fill("#token", token)
    page.press("#token", "Enter")
    page.wait_for_selector("#task:not([hidden])")
    return page


def test_a_reviewer_signs_in_plays_corrects_and_submits_with_the_keyboard(server, browser) -> None:
    base, queue, tokens = server
    page = sign_in(browser, base, tokens["ana"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    # the first task carries an XSS payload: it must show as text and run nothing
    first_id = page.locator("#clip-meta").inner_text().split()[1]
    assert "<script>" in page.locator("#editor").inner_text()
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#editor img").count() == 0 and page.locator("#editor script").count() == 0
    low = page.locator("#editor .w.low").first
    assert "confidence 0.10" in low.get_attribute("title")

    # play: the media element advances
    page.click("#play")
    page.wait_for_function("document.getElementById('audio').currentTime > 0", timeout=15_000)
    page.wait_for_function("document.getElementById('audio').duration > 0")
    page.screenshot(path=str(ARTIFACTS / "task-screen.png"), full_page=True)
    page.keyboard.press("Control+Space")  # pause

    # a typical correction, timed and counted from the keyboard: retype the text, pick the language, submit
    keys = 0
    started = time.perf_counter()
    page.click("#editor")
    page.keyboard.press("Control+A")
    keys += 1
    corrected = "Hola amigo."
    page.keyboard.type(corrected)
    keys += len(corrected)
    page.keyboard.press("Alt+L")
    page.select_option("#lang", "es-ES")  # from the focused selector: one keystroke would do; counted as one
    keys += 2
    page.keyboard.press("Control+Enter")
    keys += 1
    page.wait_for_function(f"!document.getElementById('clip-meta').textContent.includes('task {first_id} ')")
    seconds = time.perf_counter() - started
    second_id = page.locator("#clip-meta").inner_text().split()[1]
    assert second_id != first_id

    with queue.Session() as s:
        review = s.scalar(select(Review).where(Review.action == "submit"))
    assert (review.text_after, review.lang_after, review.task_id) == (corrected, "es-ES", int(first_id))
    (ARTIFACTS / "correction.json").write_text(json.dumps({"keystrokes": keys, "seconds": round(seconds, 2)}))

    # a second reviewer never gets the task the first holds
    other = sign_in(browser, base, tokens["ben"])
    assert other.locator("#clip-meta").inner_text().split()[1] not in (first_id, second_id)

    # the progress page
    boss = sign_in(browser, base, tokens["boss"])
    boss.click("#nav-progress")
    boss.wait_for_selector("#per-reviewer tr:nth-child(2)")
    assert "ana" in boss.locator("#per-reviewer").inner_text()
    assert boss.locator("#admin").is_visible()
    boss.screenshot(path=str(ARTIFACTS / "progress-page.png"), full_page=True)


def test_skip_and_flags_from_the_keyboard(server, browser) -> None:
    base, queue, tokens = server
    page = sign_in(browser, base, tokens["ana"])
    first_id = page.locator("#clip-meta").inner_text().split()[1]
    page.keyboard.press("Alt+S")
    page.wait_for_function(f"!document.getElementById('clip-meta').textContent.includes('task {first_id} ')")
    page.keyboard.press("Alt+F")
    page.keyboard.press("Alt+Space")
    page.keyboard.press("Control+Enter")
    page.wait_for_timeout(300)
    with queue.Session() as s:
        actions = [(r.action, r.flags) for r in s.scalars(select(Review).order_by(Review.id))]
    assert ("skip", []) in actions
    assert any(a == "submit" and len(f) == 1 for a, f in actions)
    assert XSS  # the payload task was the one skipped; nothing ran (checked above)

"""The try-it page at ``/`` of a real ``earmark serve``, in Debian's headless Chromium (Playwright).

The microphone is Chromium's fake capture device playing a demo clip in a loop; the page
streams it over the realtime WebSocket and uploads the same clip to the file API. Screenshots go
to ``build/test-artifacts/`` (not committed).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "build" / "test-artifacts"
CLIP = ROOT / "demo" / "corpus" / "short" / "en-US-01.flac"
CLIP_LOCALE = "en-US"
PAD_S = 1.0  # silence after the clip, so that the loop has a pause between repetitions


def words_of(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def wait_until(page, condition: str, what: str, timeout_s: float = 60.0) -> None:
    """Wait for a JavaScript condition; on timeout, fail with what the page showed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(condition, timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        shown = {
            k: page.locator(k).inner_text() for k in ("#status", "#sent", "#vad", "#error", "#live-text", "#items")
        }
        pytest.fail(f"the page did not get to {what} within {timeout_s:g} s; it showed {shown}")


@pytest.fixture(scope="module")
def clip(engine):
    """(16 kHz audio, its offline transcript) of the demo clip."""
    from asr.audio import decode_audio

    audio = decode_audio(CLIP)
    return audio, engine.transcribe([audio])[0]


@pytest.fixture(scope="module")
def fake_microphone(clip, tmp_path_factory) -> Path:
    """The clip and a second of silence as a 16-bit WAV: what Chromium's fake microphone plays, looped."""
    import soundfile as sf

    audio, _ = clip
    path = tmp_path_factory.mktemp("mic") / "clip.wav"
    sf.write(path, np.concatenate([audio, np.zeros(int(16_000 * PAD_S), np.float32)]), 16_000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(fake_microphone):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium for the tests")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={fake_microphone}",
            ],
        )
        yield b
        b.close()


@pytest.fixture()
def page(browser, served):
    """The page, signed in with the server's API key; fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(served.url + "/")
    page.fill("#api-key", served.key)
    page.click("#save-key")
    page.wait_for_selector("#latency option", state="attached")
    page.wait_for_function("!document.getElementById('mic-start').disabled")
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def test_the_page_needs_the_key_and_keeps_it(browser, served) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(served.url + "/")
    page.wait_for_selector("#error:not([hidden])")
    assert "invalid_api_key" in page.locator("#error").inner_text()
    assert page.locator("#mic-start").is_disabled()

    page.fill("#api-key", served.key)
    page.click("#save-key")
    page.wait_for_selector("#latency option", state="attached")
    assert page.locator("#error").is_hidden()
    page.reload()  # the key is remembered by the browser
    page.wait_for_selector("#latency option", state="attached")
    assert page.input_value("#api-key") == served.key
    locales = page.locator("#language option").evaluate_all("options => options.map(o => o.value)")
    assert locales[0] == "auto" and CLIP_LOCALE in locales
    assert page.input_value("#latency") == "56,13"  # the demo model's default latency mode
    context.close()


def test_the_microphone_streams_and_a_manual_turn_completes(page, clip) -> None:
    audio, offline = clip
    expected = words_of(offline.text)
    assert len(expected) >= 4, offline.text
    page.check("input[name=turns][value=manual]")
    page.click("#mic-start")

    # partial text while the clip plays; then enough audio that the loop holds the whole clip once
    wait_until(page, "document.querySelectorAll('#live-text .word').length >= 2", "live words")
    loop_s = len(audio) / 16_000 + PAD_S
    wait_until(page, f"Number(document.getElementById('sent').dataset.seconds) >= {2 * loop_s + 0.5}", "two loops sent")
    assert page.locator("#live-text .lang").count() >= 1
    page.click("#mic-stop")
    wait_until(page, "document.getElementById('status').textContent === 'stopped'", "the completed turn")

    item = page.locator("#items .item").first
    heard = set(words_of(" ".join(item.locator(".sentence .text").all_inner_texts())))
    found = [w for w in expected if w in heard]
    assert len(found) >= 0.6 * len(expected), (expected, item.inner_text())
    assert item.locator(".lang").count() >= 1
    assert CLIP_LOCALE in item.locator(".lang").all_inner_texts()
    assert page.locator("#items .item").count() == 1  # one manual turn: Start to Stop
    assert page.locator("#live-text .partial").count() == 0
    assert page.locator("#error").is_hidden()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-page-microphone.png"), full_page=True)


def test_with_server_vad_each_spoken_turn_becomes_an_item(page, clip) -> None:
    _, offline = clip
    page.click("#mic-start")  # server VAD is the default
    wait_until(page, "document.getElementById('vad').textContent === 'speech'", "speech started")
    wait_until(page, "document.querySelectorAll('#items .item').length >= 1", "a turn ended by the VAD")
    page.click("#mic-stop")
    wait_until(page, "document.getElementById('status').textContent === 'stopped'", "the end of the session")

    first = page.locator("#items .item").first
    heard = set(words_of(" ".join(first.locator(".sentence .text").all_inner_texts())))
    expected = words_of(offline.text)
    assert len([w for w in expected if w in heard]) >= 0.6 * len(expected), (expected, first.inner_text())
    assert page.locator("#vad").inner_text() == "idle"
    assert page.locator("#error").is_hidden()


def test_an_uploaded_file_shows_its_sentences_languages_and_unsure_words(page, clip, served) -> None:
    _, offline = clip
    page.set_input_files("#file", str(CLIP))

    page.click("#stream-file")  # stream=true: the text as the parts are decoded
    wait_until(
        page, "document.querySelector('#file-live .file-meta').textContent.startsWith('duration')", "the streamed text"
    )
    assert page.locator("#file-live .text").inner_text() == offline.text

    page.click("#transcribe")  # verbose_json
    wait_until(page, "!document.getElementById('file-result').hidden", "the verbose result")
    assert page.locator("#file-text").inner_text() == offline.text
    sentences = page.locator("#segments .sentence")
    assert sentences.count() == len(offline.sentences)
    assert page.locator("#segments .lang").all_inner_texts() == [s.lang for s in offline.sentences]
    assert CLIP_LOCALE in page.locator("#segments .lang").all_inner_texts()

    words = page.locator("#segments .word")
    assert words.all_inner_texts() == [w.word for w in offline.words]
    low = [w.word for w in offline.words if w.confidence < 0.5]
    assert low, "the clip should have words the demo model is unsure about"
    assert page.locator("#segments .word.low").all_inner_texts() == low
    assert "confidence" in words.first.get_attribute("title")

    meta = page.locator("#file-meta").inner_text()
    assert f"duration {offline.duration_s:.2f} s" in meta
    model_id = page.locator("#model-id").inner_text()
    assert model_id and f"model {model_id}" in meta
    assert page.locator("#error").is_hidden()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)

"""The file API of ``earmark serve`` through the official ``openai`` SDK, as a user's client calls it:
a real server on loopback (embedded Ray, Serve, the demo model), every response format, streaming,
long recordings, keys and bad requests."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.serveserver import ROOT

pytestmark = pytest.mark.slow


def client(server, key: str | None = None):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key or server.key, max_retries=0, timeout=120)


def wav_bytes(audio: np.ndarray, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip(short_clips):
    """A two-language demo clip: (manifest row, audio)."""
    return next((row, audio) for row, audio in short_clips if len(row["langs"]) == 2)


def test_models_lists_the_served_model_with_its_hash_locales_and_latency_modes(served, engine):
    models = client(served).models.list()
    (model,) = models.data
    assert model.id == engine.info.model_id and "@" in model.id
    extra = model.model_extra["earmark"]
    assert extra["locales"] == list(engine.info.locales)
    assert [56, 13] in extra["att_context_sizes"] and [56, 0] in extra["att_context_sizes"]


def test_every_response_format_through_the_sdk_matches_the_engine(served, engine, clip):
    import srt
    import webvtt

    row, audio = clip
    (expected,) = engine.transcribe([audio])
    sdk = client(served)
    upload = ("clip.flac", open(row["audio_filepath"], "rb").read())

    as_json = sdk.audio.transcriptions.create(model="earmark", file=upload)
    assert as_json.text == expected.text and as_json.text
    as_text = sdk.audio.transcriptions.create(model="earmark", file=upload, response_format="text")
    assert as_text.strip() == expected.text

    cues = list(srt.parse(sdk.audio.transcriptions.create(model="earmark", file=upload, response_format="srt")))
    assert " ".join(c.content.replace("\n", " ") for c in cues) == expected.text
    assert cues[0].start.total_seconds() >= 0 and cues[-1].end.total_seconds() <= expected.duration_s + 0.1
    vtt = sdk.audio.transcriptions.create(model="earmark", file=upload, response_format="vtt")
    captions = webvtt.from_buffer(io.StringIO(vtt)).captions
    assert " ".join(c.text.replace("\n", " ") for c in captions) == expected.text

    verbose = sdk.audio.transcriptions.create(
        model="earmark", file=upload, response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    assert verbose.text == expected.text and verbose.duration == pytest.approx(expected.duration_s, abs=0.01)
    assert [s.text for s in verbose.segments] == [s.text for s in expected.sentences]
    extras = [s.model_extra for s in verbose.segments]
    assert [e["locale"] for e in extras] == [s.lang for s in expected.sentences] == row["langs"]
    assert all(0.0 <= e["confidence"] <= 1.0 for e in extras)
    assert [w.word for w in verbose.words] == [w.word for w in expected.words]
    assert all(0 <= w.start <= w.end <= verbose.duration + 0.1 for w in verbose.words)
    assert all("confidence" in w.model_extra for w in verbose.words)
    assert (
        verbose.language
        == {"en": "english", "es": "spanish", "de": "german", "fr": "french"}[expected.lang_detected[:2]]
    )

    words_only = sdk.audio.transcriptions.create(
        model="earmark", file=upload, response_format="verbose_json", timestamp_granularities=["word"]
    )
    assert words_only.words and not getattr(words_only, "segments", None)


def test_language_and_latency_mode_are_honoured(served, engine, clip):
    from asr.engine import TranscribeOptions

    row, audio = clip
    (forced,) = engine.transcribe([audio], langs=["de-DE"], options=TranscribeOptions(att_context=(56, 3)))
    out = client(served).audio.transcriptions.create(
        model="earmark",
        file=("clip.wav", wav_bytes(audio)),
        language="de",
        response_format="verbose_json",
        extra_body={"att_context": "56,3"},
    )
    assert out.text == forced.text
    assert all(s.model_extra["locale"] == "de-DE" for s in out.segments)


def test_streaming_sends_append_only_deltas_then_the_whole_text(served, engine, corpus):
    long_row = next(r for r in corpus if "sentences" in r)
    sdk = client(served)
    upload = ("talk.flac", open(long_row["audio_filepath"], "rb").read())
    whole = sdk.audio.transcriptions.create(model="earmark", file=upload)
    events = list(sdk.audio.transcriptions.create(model="earmark", file=upload, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    (done,) = [e for e in events if e.type == "transcript.text.done"]
    assert len(deltas) >= 3, "a long recording streams part by part"
    assert "".join(deltas) == done.text == whole.text
    assert events[-1].type == "transcript.text.done"


def test_a_long_recording_is_cut_at_pauses_as_the_batch_job_cuts_it(served, engine, corpus):
    from asr.audio import decode_audio
    from asr.vad import span_audio, split_long_audio

    long_row = next(r for r in corpus if "sentences" in r)
    audio = decode_audio(long_row["audio_filepath"])
    spans = split_long_audio(audio)
    assert len(spans) >= 3
    parts = engine.transcribe([span_audio(audio, a, b) for a, b in spans])
    out = client(served).audio.transcriptions.create(
        model="earmark",
        file=("talk.flac", open(long_row["audio_filepath"], "rb").read()),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert out.text == " ".join(p.text for p in parts if p.text)
    # times are absolute: the last words lie in the last part, past 30 s
    assert out.words[-1].start >= spans[-1][0] - 0.05 and out.words[-1].end > 30.0
    starts = [w.start for w in out.words]
    assert starts == sorted(starts)
    assert out.duration == pytest.approx(len(audio) / 16_000, abs=0.01)


def test_keys_sizes_and_bad_requests_get_openai_errors_with_messages(served, clip):
    import openai

    row, audio = clip
    good = ("clip.wav", wav_bytes(audio))
    with pytest.raises(openai.AuthenticationError) as no_key:
        client(served, key="em-not-a-key").audio.transcriptions.create(model="earmark", file=good)
    assert no_key.value.status_code == 401 and "API key" in no_key.value.message
    bare = httpx.post(served.url + "/v1/audio/transcriptions", files={"file": good}, data={"model": "m"})
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"

    sdk = client(served)
    with pytest.raises(openai.BadRequestError) as garbage:
        sdk.audio.transcriptions.create(model="earmark", file=("notes.wav", b"this is not audio at all" * 100))
    assert garbage.value.status_code == 400 and "notes.wav" in garbage.value.message
    with pytest.raises(openai.BadRequestError) as lang:
        sdk.audio.transcriptions.create(model="earmark", file=good, language="xx")
    assert "language 'xx'" in lang.value.message and "en-US" in lang.value.message
    with pytest.raises(openai.APIStatusError) as big:  # the test server's limit is 8 MB
        sdk.audio.transcriptions.create(
            model="earmark", file=("big.wav", wav_bytes(np.zeros(16_000 * 140, np.float32)))
        )
    assert big.value.status_code == 413 and "8 MB" in big.value.message

    def post(**fields: str) -> httpx.Response:
        url = served.url + "/v1/audio/transcriptions"
        return httpx.post(url, headers=served.headers, files={"file": good}, data={"model": "m", **fields})

    fmt = post(response_format="docx")
    assert fmt.status_code == 400 and "verbose_json" in fmt.json()["error"]["message"]
    mode = post(att_context="56,7")
    assert mode.status_code == 400 and "56,13" in mode.json()["error"]["message"]
    missing = httpx.post(served.url + "/v1/audio/transcriptions", headers=served.headers, data={"model": "m"})
    assert missing.status_code == 400 and "'file'" in missing.json()["error"]["message"]
    # the server is still well after all of it
    assert sdk.audio.transcriptions.create(model="earmark", file=good).text


def test_serve_refuses_to_listen_beyond_loopback_without_keys():
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "serve", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2 and "--api-keys" in out.stderr and "earmark api-key" in out.stderr


def test_the_printed_serve_config_passes_serves_own_schema():
    from ray.serve.schema import ServeDeploySchema

    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "serve", "--print-config", "--autoscale", "1,4", "--max-sessions", "32"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "serve.app:build" and app.args == {"device": "cpu", "max_sessions": 32}
    (deployment,) = app.deployments
    assert deployment.graceful_shutdown_timeout_s >= 300 and deployment.max_ongoing_requests > 32
    assert "request_timeout_s" not in config["http_options"]
    from serve.app import build

    assert build(app.args) is not None  # the import path builds an application from these args

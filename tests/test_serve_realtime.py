"""Realtime transcription over WebSocket against a real ``earmark serve``: a plain ``websockets``
client and the ``openai`` SDK's realtime client, several sessions at once, the limits, bad events,
and a replica killed mid-stream."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CHUNK_S = 0.1


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def quantized(audio: np.ndarray) -> np.ndarray:
    """What the server decodes from :func:`pcm16` of ``audio``."""
    return np.frombuffer(pcm16(audio), "<i2").astype(np.float32) / 32768.0


def session_update(*, rate: int = 16_000, lang: str | None = None, att=None, vad: bool = False) -> dict:
    transcription: dict = {"model": "earmark"}
    if lang:
        transcription["language"] = lang
    if att:
        transcription["att_context"] = list(att)
    return {
        "type": "session.update",
        "session": {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": rate},
                    "transcription": transcription,
                    "turn_detection": {"type": "server_vad", "silence_duration_ms": 500} if vad else None,
                }
            },
        },
    }


async def connect(server, **kwargs):
    from websockets.asyncio.client import connect as ws_connect

    return await ws_connect(
        server.ws_url + "/v1/realtime?intent=transcription",
        additional_headers={"Authorization": f"Bearer {server.key}"},
        max_size=None,
        **kwargs,
    )


async def recv(ws, timeout: float = 60.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def until(ws, kind: str, timeout: float = 60.0) -> tuple[dict, list[dict]]:
    """Events up to and including the first of type ``kind``."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        event = await recv(ws, max(0.1, deadline - time.monotonic()))
        seen.append(event)
        if event["type"] == kind:
            return event, seen


async def stream_clip(server, audio: np.ndarray, *, lang=None, att=None, realtime: bool = False) -> tuple[dict, list]:
    """One session: configure, append ``audio`` in 100 ms chunks, commit; the completed event and all events."""
    async with await connect(server) as ws:
        created = await recv(ws)
        assert created["type"] == "session.created"
        await ws.send(json.dumps(session_update(lang=lang, att=att)))
        updated = await recv(ws)
        assert updated["type"] == "session.updated", updated
        step = int(16_000 * CHUNK_S)
        for i in range(0, len(audio), step):
            chunk = base64.b64encode(pcm16(audio[i : i + step])).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            if realtime:
                await asyncio.sleep(CHUNK_S)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        completed, events = await until(ws, "conversation.item.input_audio_transcription.completed")
        return completed, events


def offline(engine, audio, *, lang="auto", att=None):
    from asr.engine import TranscribeOptions

    (t,) = engine.transcribe([quantized(audio)], langs=[lang], options=TranscribeOptions(att_context=att))
    return t


def test_a_plain_client_streams_a_clip_and_gets_the_offline_transcript(served, engine, short_clips):
    row, audio = next((r, a) for r, a in short_clips if len(r["langs"]) == 2)
    completed, events = asyncio.run(stream_clip(served, audio, att=(56, 3), realtime=True))
    expected = offline(engine, audio, att=(56, 3))
    assert completed["transcript"] == expected.text and expected.text
    deltas = [e for e in events if e["type"].endswith("transcription.delta")]
    assert len(deltas) >= 2, "text arrives while the audio does"
    assert "".join(d["delta"] for d in deltas) == expected.text
    positions = [d["earmark"]["decoded_s"] for d in deltas]
    assert positions == sorted(positions)
    extra = completed["earmark"]
    assert [s["lang"] for s in extra["sentences"]] == [s.lang for s in expected.sentences]
    assert [w["word"] for w in extra["words"]] == [w.word for w in expected.words]
    assert all(0.0 <= w["confidence"] <= 1.0 and w["start"] <= w["end"] for w in extra["words"])
    assert extra["att_context"] == [56, 3] and extra["model_id"] == engine.info.model_id
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert committed and committed[0]["item_id"] == completed["item_id"]


def test_three_sessions_at_once_in_two_languages_and_two_latency_modes(served, engine, short_clips):
    es = next(a for r, a in short_clips if r["langs"] == ["es-ES"])
    de = next(a for r, a in short_clips if r["langs"] == ["de-DE"])
    en = next(a for r, a in short_clips if r["langs"] == ["en-US"])

    async def all_three():
        return await asyncio.gather(
            stream_clip(served, es, realtime=True),
            stream_clip(served, de, lang="de-DE", realtime=True),
            stream_clip(served, en, att=(56, 3), realtime=True),
        )

    (c_es, _), (c_de, _), (c_en, _) = asyncio.run(all_three())
    assert c_es["transcript"] == offline(engine, es).text
    assert c_de["transcript"] == offline(engine, de, lang="de-DE").text
    assert c_de["earmark"]["lang_requested"] == "de-DE"
    assert c_en["transcript"] == offline(engine, en, att=(56, 3)).text
    assert c_en["earmark"]["att_context"] == [56, 3] and c_es["earmark"]["att_context"] != [56, 3]


def test_the_openai_sdk_realtime_client_with_server_vad_at_24_khz(served, engine, short_clips):
    import soxr
    from openai import AsyncOpenAI

    row, audio = next((r, a) for r, a in short_clips if r["langs"] == ["en-US"])
    silence = np.zeros(int(16_000 * 1.2), np.float32)
    speech = np.concatenate([silence, audio, silence])
    at_24k = soxr.resample(speech, 16_000, 24_000).astype(np.float32)

    async def run():
        sdk = AsyncOpenAI(base_url=served.url + "/v1", api_key=served.key, max_retries=0)
        events = []
        async with sdk.realtime.connect(model="earmark", extra_query={"intent": "transcription"}) as conn:
            await conn.send(session_update(rate=24_000, vad=True))
            step = int(24_000 * CHUNK_S)
            for i in range(0, len(at_24k), step):
                await conn.send(
                    {
                        "type": "input_audio_buffer.append",
                        "audio": base64.b64encode(pcm16(at_24k[i : i + step])).decode(),
                    }
                )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                event = await asyncio.wait_for(conn.recv(), 60)
                events.append(event)
                if event.type == "conversation.item.input_audio_transcription.completed":
                    return events
        return events

    events = asyncio.run(run())
    kinds = [e.type for e in events]
    assert kinds[0] == "session.created"
    for kind in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
    ):
        assert kind in kinds, kinds
    started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
    assert 700 <= started.audio_start_ms <= 1_600  # the speech begins 1.2 s in
    completed = events[-1]
    # the turn's audio, resampled as the server resamples a stream (soxr, chunk by chunk), is what offline gets
    stream = soxr.ResampleStream(24_000, 16_000, 1, dtype="float32", quality="HQ")
    step = int(24_000 * CHUNK_S)
    heard = np.concatenate(
        [stream.resample_chunk(quantized(at_24k[i : i + step])) for i in range(0, len(at_24k), step)]
    )
    first = round(completed.model_extra["earmark"]["start_s"] * 16_000)
    turn = heard[first : first + round(completed.model_extra["earmark"]["duration_s"] * 16_000)]
    (expected,) = engine.transcribe([turn])
    assert completed.transcript == expected.text
    assert set(offline(engine, audio).text.split()) <= set(expected.text.split())


def test_bad_events_get_typed_errors_and_the_session_goes_on(served, engine, short_clips):
    row, audio = next((r, a) for r, a in short_clips if r["langs"] == ["fr-FR"])

    async def run():
        async with await connect(served) as ws:
            await recv(ws)
            await ws.send(json.dumps(session_update()))  # 16 kHz, manual commits
            assert (await recv(ws))["type"] == "session.updated"
            codes = []
            for bad in [
                "not json",
                json.dumps([1, 2]),
                json.dumps({"type": "response.create"}),
                json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}),
                json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
                json.dumps({"type": "input_audio_buffer.commit"}),
                json.dumps(session_update(lang="xx")),
                json.dumps(session_update(att=(56, 7))),
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "type": "transcription",
                            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 44_100}}},
                        },
                    }
                ),
                json.dumps(
                    {
                        "type": "input_audio_buffer.append",
                        "audio": base64.b64encode(pcm16(np.zeros(16_000 * 25, np.float32))).decode(),
                    }
                ),
            ]:
                await ws.send(bad)
                event = await recv(ws)
                assert event["type"] == "error", event
                codes.append(event["error"]["code"])
                assert event["error"]["message"]
            step = 1_600
            for i in range(0, len(audio), step):
                await ws.send(
                    json.dumps(
                        {
                            "type": "input_audio_buffer.append",
                            "audio": base64.b64encode(pcm16(audio[i : i + step])).decode(),
                        }
                    )
                )
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            completed, _ = await until(ws, "conversation.item.input_audio_transcription.completed")
            return codes, completed

    codes, completed = asyncio.run(run())
    assert codes == [
        "invalid_json",
        "invalid_event",
        "unknown_event",
        "invalid_audio",
        "invalid_audio",
        "input_audio_buffer_commit_empty",
        "unsupported_language",
        "invalid_latency_mode",
        "invalid_audio_format",
        "buffer_overflow",
    ]
    assert completed["transcript"] == offline(engine, audio).text


def test_over_the_session_cap_a_client_gets_an_error_and_1013(served):
    from websockets.exceptions import ConnectionClosed

    async def run():
        open_ = [await connect(served) for _ in range(4)]  # the test server's cap
        for ws in open_:
            assert (await recv(ws))["type"] == "session.created"
        extra = await connect(served)
        event = await recv(extra)
        with pytest.raises(ConnectionClosed):
            await recv(extra, timeout=10)
        code = extra.close_code
        for ws in open_:
            await ws.close()
        await asyncio.sleep(0.5)
        again = await connect(served)  # a place is free again
        first = await recv(again)
        await again.close()
        return event, code, first

    event, code, first = asyncio.run(run())
    assert event["type"] == "error" and event["error"]["code"] == "too_many_sessions"
    assert code == 1013 and first["type"] == "session.created"


def test_an_idle_session_is_closed_with_a_message(served):
    from websockets.exceptions import ConnectionClosed

    async def run():
        async with await connect(served) as ws:
            await recv(ws)
            started = time.monotonic()
            event = await recv(ws, timeout=30)
            with pytest.raises(ConnectionClosed):
                await recv(ws, timeout=10)
            return event, time.monotonic() - started, ws.close_code

    event, waited, code = asyncio.run(run())
    assert event["error"]["code"] == "idle_timeout" and "6 s" in event["error"]["message"]
    assert 5.0 <= waited <= 15.0 and code == 1000


def test_a_socket_without_a_key_is_refused(served):
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import InvalidStatus

    async def run():
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(served.ws_url + "/v1/realtime?intent=transcription")
        return refused.value.response.status_code

    assert asyncio.run(run()) in (401, 403)


def test_browsers_may_send_the_key_as_a_subprotocol(served):
    from websockets.asyncio.client import connect as ws_connect

    async def run():
        async with await ws_connect(
            served.ws_url + "/v1/realtime?intent=transcription",
            subprotocols=["realtime", f"openai-insecure-api-key.{served.key}"],
        ) as ws:
            return (await recv(ws))["type"], ws.subprotocol

    assert asyncio.run(run()) == ("session.created", "realtime")


def test_a_killed_replica_closes_its_sessions_and_serve_brings_it_back(served, engine, short_clips):
    import httpx
    import psutil
    from websockets.exceptions import ConnectionClosed

    row, audio = next((r, a) for r, a in short_clips if r["langs"] == ["en-US"])

    def replica_pids() -> list[int]:
        """The replica processes of this test's server (other servers may run on the machine)."""
        return [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if any("ServeReplica:earmark:EarmarkASR" in part for part in (p.info["cmdline"] or []))
            and served.proc.pid in {q.pid for q in p.parents()}
        ]

    async def run():
        async with await connect(served) as ws:
            await recv(ws)
            await ws.send(json.dumps(session_update()))
            await recv(ws)
            await ws.send(
                json.dumps(
                    {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(audio[:8_000])).decode()}
                )
            )
            (pid,) = replica_pids()
            os.kill(pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):
                while True:
                    await recv(ws, timeout=30)
            return pid, time.monotonic() - started

    killed, closed_after = asyncio.run(run())
    assert closed_after < 30
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(served.url + "/v1/models", headers=served.headers, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pids = replica_pids()
    assert pids and killed not in pids
    completed, _ = asyncio.run(stream_clip(served, audio))
    assert completed["transcript"] == offline(engine, audio).text

"""The realtime transcription protocol of one WebSocket session (every event: docs/realtime.md).

A :class:`RealtimeSession` turns client events into audio for the replica's
:class:`asr.scheduler.StreamScheduler` and the scheduler's progress into server events. It never
touches the socket: it puts events on an outgoing queue that one writer task drains, and the model
thread hands it progress through ``loop.call_soon_threadsafe``, so neither a slow client nor the
model blocks the other. A bad event gets an ``error`` event and changes nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from serve.turns import SAMPLE_RATE, RecentAudio, TurnConfig, TurnDetector

if TYPE_CHECKING:
    from asr.results import Transcript
    from asr.scheduler import StreamHandle
    from asr.streaming import StreamUpdate
    from serve.runtime import Runtime

log = logging.getLogger(__name__)

#: Close codes: normal end (a limit reached is still a clean end), and "try again later".
CLOSE_NORMAL = 1000
CLOSE_TRY_AGAIN = 1013

#: beta ``input_audio_format`` names -> (encoding, rate)
BETA_FORMATS = {"pcm16": ("pcm16", 24_000), "pcm16_16k": ("pcm16", 16_000), "float32_16k": ("float32", 16_000)}
GA_TYPES = {"audio/pcm": "pcm16", "audio/float32": "float32"}


class ProtocolError(Exception):
    """A client event earmark cannot act on: becomes an ``error`` event, the session goes on."""

    def __init__(self, code: str, message: str, *, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.message, self.param, self.kind = code, message, param, kind


def error_event(
    code: str,
    message: str,
    *,
    param: str | None = None,
    event_id: str | None = None,
    kind: str = "invalid_request_error",
) -> dict[str, Any]:
    return {
        "type": "error",
        "event_id": _event_id(),
        "error": {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id},
    }


def _event_id() -> str:
    return "event_" + uuid.uuid4().hex[:20]


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What a session is set to: the input format, language, latency mode and turn detection."""

    encoding: str = "pcm16"
    rate: int = 24_000
    lang: str = "auto"
    model: str | None = None
    att_context: tuple[int, int] = (56, 13)
    turn: TurnConfig | None = field(default_factory=TurnConfig)

    def transcription(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "language": None if self.lang == "auto" else self.lang,
            "att_context": list(self.att_context),
        }

    def to_ga(self) -> dict[str, Any]:
        kind = next(k for k, v in GA_TYPES.items() if v == self.encoding)
        return {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": kind, "rate": self.rate},
                    "transcription": self.transcription(),
                    "turn_detection": self.turn.to_event() if self.turn else None,
                }
            },
        }

    def to_beta(self) -> dict[str, Any]:
        fmt = next(k for k, v in BETA_FORMATS.items() if v == (self.encoding, self.rate))
        return {
            "input_audio_format": fmt,
            "input_audio_transcription": self.transcription(),
            "turn_detection": self.turn.to_event() if self.turn else None,
        }


@dataclass(slots=True)
class Item:
    """One turn: the audio between two commits, decoded while it arrives."""

    id: str
    start_sample: int
    handle: StreamHandle
    samples: int = 0
    sent_text: str = ""
    sent_words: int = 0

    @property
    def start_s(self) -> float:
        return self.start_sample / SAMPLE_RATE


class RealtimeSession:
    def __init__(self, runtime: Runtime, send: Callable[[dict[str, Any]], None]) -> None:
        self.runtime = runtime
        self.send = send
        self.loop = asyncio.get_running_loop()
        self.config = SessionConfig(att_context=runtime.info.default_att_context)
        self.position = 0  # 16 kHz samples received in the session
        self.item: Item | None = None
        self.previous_item_id: str | None = None
        self._detector: TurnDetector | None = None
        self._recent: RecentAudio | None = None
        self._resampler: Any = None
        self._progress: asyncio.Queue[tuple[str, Item, Any]] = asyncio.Queue()
        self._pump = asyncio.ensure_future(self._forward_progress())
        self._turns_ready = False
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "session.update": self._session_update,
            "transcription_session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit_event,
            "input_audio_buffer.clear": self._clear,
        }

    # -- lifecycle ----------------------------------------------------------------------

    def created(self) -> dict[str, Any]:
        settings = self.runtime.settings
        return {
            "type": "session.created",
            "event_id": _event_id(),
            "session": {"id": "sess_" + uuid.uuid4().hex[:20], **self.config.to_ga()},
            "earmark": {
                "model_id": self.runtime.info.model_id,
                "max_session_s": settings.max_session_s,
                "idle_timeout_s": settings.idle_timeout_s,
                "max_buffer_s": settings.max_buffer_s,
                "att_context_sizes": [list(a) for a in self.runtime.info.att_context_sizes],
            },
        }

    async def close(self) -> None:
        """The socket is gone: drop the open item (no result) and stop forwarding."""
        if self.item is not None:
            self.item.handle.cancel()
            self.item = None
        self._pump.cancel()

    # -- client events ------------------------------------------------------------------

    def handle(self, text: str | bytes) -> None:
        """Act on one client event; a bad one becomes an ``error`` event."""
        event_id = None
        try:
            try:
                event = json.loads(text)
            except (ValueError, UnicodeDecodeError):
                raise ProtocolError("invalid_json", "the event is not JSON; send one JSON object per message") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ProtocolError("invalid_event", "an event is a JSON object with a string 'type'", param="type")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            handler = self._handlers.get(event["type"])
            if handler is None:
                known = ", ".join(sorted(self._handlers))
                raise ProtocolError(
                    "unknown_event", f"unknown event type {event['type']!r}; this server takes {known}", param="type"
                )
            handler(event)
        except ProtocolError as exc:
            self.send(error_event(exc.code, exc.message, param=exc.param, event_id=event_id, kind=exc.kind))

    def _session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise ProtocolError("invalid_event", "session.update needs a 'session' object", param="session")
        beta = event["type"] == "transcription_session.update"
        new = self._parse_beta(session) if beta else self._parse_ga(session)
        if new != self.config and self.item is not None:
            raise ProtocolError(
                "session_locked",
                "a turn is in progress: commit or clear the audio buffer before changing the session",
                param="session",
            )
        if (new.encoding, new.rate) != (self.config.encoding, self.config.rate):
            self._resampler = None
        if new.turn != self.config.turn:
            self._turns_ready = False
        self.config = new
        kind = "transcription_session.updated" if beta else "session.updated"
        shape = new.to_beta() if beta else new.to_ga()
        self.send({"type": kind, "event_id": _event_id(), "session": shape})

    def _parse_ga(self, session: dict[str, Any]) -> SessionConfig:
        config = self.config
        kind = session.get("type", "transcription")
        if kind != "transcription":
            raise ProtocolError(
                "invalid_event",
                f"session.type {kind!r}: this server transcribes only; use 'transcription'",
                param="session.type",
            )
        audio = _obj(session, "audio", "session.audio")
        inp = _obj(audio, "input", "session.audio.input")
        if "format" in inp:
            fmt = _obj(inp, "format", "session.audio.input.format")
            encoding = GA_TYPES.get(fmt.get("type", "audio/pcm"))
            rate = fmt.get("rate", 24_000)
            if encoding is None or rate not in (16_000, 24_000) or (encoding == "float32" and rate != 16_000):
                raise ProtocolError(
                    "invalid_audio_format",
                    f"format {fmt!r}: use {{type: audio/pcm, rate: 24000}} (pcm16), rate 16000, or "
                    "{type: audio/float32, rate: 16000}",
                    param="session.audio.input.format",
                )
            config = replace(config, encoding=encoding, rate=int(rate))
        if "transcription" in inp:
            config = self._parse_transcription(config, inp["transcription"], "session.audio.input.transcription")
        if "turn_detection" in inp:
            config = self._parse_turns(config, inp["turn_detection"], "session.audio.input.turn_detection")
        return config

    def _parse_beta(self, session: dict[str, Any]) -> SessionConfig:
        config = self.config
        if "input_audio_format" in session:
            fmt = session["input_audio_format"]
            if fmt not in BETA_FORMATS:
                raise ProtocolError(
                    "invalid_audio_format",
                    f"input_audio_format {fmt!r}: use one of {', '.join(BETA_FORMATS)}",
                    param="session.input_audio_format",
                )
            encoding, rate = BETA_FORMATS[fmt]
            config = replace(config, encoding=encoding, rate=rate)
        if "input_audio_transcription" in session:
            config = self._parse_transcription(
                config, session["input_audio_transcription"], "session.input_audio_transcription"
            )
        if "turn_detection" in session:
            config = self._parse_turns(config, session["turn_detection"], "session.turn_detection")
        return config

    def _parse_transcription(self, config: SessionConfig, value: Any, param: str) -> SessionConfig:
        if value is None:
            return config
        if not isinstance(value, dict):
            raise ProtocolError("invalid_event", f"{param} must be an object", param=param)
        if "language" in value:
            try:
                config = replace(config, lang=self.runtime.resolve_language(value["language"]))
            except (ValueError, AttributeError) as exc:
                raise ProtocolError("unsupported_language", str(exc), param=f"{param}.language") from None
        if "att_context" in value:
            try:
                config = replace(config, att_context=self.runtime.resolve_att_context(value["att_context"]))
            except ValueError as exc:
                raise ProtocolError("invalid_latency_mode", str(exc), param=f"{param}.att_context") from None
        if isinstance(value.get("model"), str):
            config = replace(config, model=value["model"])
        return config

    @staticmethod
    def _parse_turns(config: SessionConfig, value: Any, param: str) -> SessionConfig:
        if value is None:
            return replace(config, turn=None)
        if not isinstance(value, dict):
            raise ProtocolError("invalid_event", f"{param} must be an object or null", param=param)
        try:
            return replace(config, turn=TurnConfig.from_event(value))
        except (TypeError, ValueError) as exc:
            raise ProtocolError("invalid_event", str(exc), param=param) from None

    def _append(self, event: dict[str, Any]) -> None:
        data = event.get("audio")
        if not isinstance(data, str):
            raise ProtocolError("invalid_event", "input_audio_buffer.append needs 'audio': base64 PCM", param="audio")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_audio", "'audio' is not valid base64", param="audio") from None
        pcm = self._samples(raw)
        waiting = self.item.handle.pending_s() if self.item is not None else 0.0
        if waiting + len(pcm) / SAMPLE_RATE > self.runtime.settings.max_buffer_s:
            raise ProtocolError(
                "buffer_overflow",
                f"more than {self.runtime.settings.max_buffer_s:g} s of audio would be waiting for the model; this "
                "chunk was dropped: send audio in chunks no faster than real time",
                param="audio",
            )
        self._ingest(pcm)

    def _samples(self, raw: bytes) -> np.ndarray:
        """16 kHz float32 from the bytes of one append, in the session's format."""
        if self.config.encoding == "pcm16":
            if len(raw) % 2:
                raise ProtocolError("invalid_audio", "pcm16 audio has an odd number of bytes", param="audio")
            pcm = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
        else:
            if len(raw) % 4:
                raise ProtocolError("invalid_audio", "float32 audio needs a multiple of 4 bytes", param="audio")
            pcm = np.frombuffer(raw, "<f4").astype(np.float32)
            if not np.isfinite(pcm).all():
                raise ProtocolError("invalid_audio", "float32 audio holds NaN or infinite samples", param="audio")
        if self.config.rate == SAMPLE_RATE:
            return pcm
        if self._resampler is None:
            import soxr

            self._resampler = soxr.ResampleStream(self.config.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return np.asarray(self._resampler.resample_chunk(pcm), dtype=np.float32)

    def _ingest(self, pcm: np.ndarray) -> None:
        start = self.position
        self.position += len(pcm)
        turn = self.config.turn
        if turn is None:
            if self.item is None:
                self._open_item(start)
            self._feed(pcm)
            return
        if not self._turns_ready:
            self._detector = TurnDetector(turn)
            self._recent = RecentAudio(turn.prefix_padding_ms + 1_000)
            self._turns_ready = True
        assert self._detector is not None and self._recent is not None
        events = self._detector.feed(pcm)
        if self.item is None:
            self._recent.push(pcm, self.position)
        else:
            self._feed(pcm)
        for ev in events:
            if ev.kind == "start" and self.item is None:
                first, audio = self._recent.take_since(ev.sample - SAMPLE_RATE * turn.prefix_padding_ms // 1000)
                item = self._open_item(first)
                self.send(
                    {
                        "type": "input_audio_buffer.speech_started",
                        "event_id": _event_id(),
                        "item_id": item.id,
                        "audio_start_ms": ev.sample * 1000 // SAMPLE_RATE,
                    }
                )
                self._feed(audio)
            elif ev.kind == "stop" and self.item is not None:
                self.send(
                    {
                        "type": "input_audio_buffer.speech_stopped",
                        "event_id": _event_id(),
                        "item_id": self.item.id,
                        "audio_end_ms": ev.sample * 1000 // SAMPLE_RATE,
                    }
                )
                self._commit()
                # what followed the end of the turn in this chunk may hold the next turn's start
                self._recent.push(pcm[max(0, ev.sample - start) :], self.position)

    def _open_item(self, first_sample: int) -> Item:
        config = self.config
        item_id = "item_" + uuid.uuid4().hex[:20]
        holder: list[Item] = []

        def on_update(partial: Transcript, update: StreamUpdate) -> None:  # on the model thread
            self.loop.call_soon_threadsafe(self._progress.put_nowait, ("partial", holder[0], partial))

        handle = self.runtime.scheduler.open(lang=config.lang, att_context=config.att_context, on_update=on_update)
        item = Item(item_id, first_sample, handle)
        holder.append(item)
        self.item = item
        return item

    def _feed(self, pcm: np.ndarray) -> None:
        if self.item is not None and len(pcm):
            self.item.handle.append(pcm)
            self.item.samples += len(pcm)

    def _commit_event(self, event: dict[str, Any]) -> None:
        if self.item is None or self.item.samples == 0:
            raise ProtocolError(
                "input_audio_buffer_commit_empty", "the audio buffer is empty: append audio before committing"
            )
        self._commit()

    def _commit(self) -> None:
        item = self.item
        assert item is not None
        self.item = None
        self.send(
            {
                "type": "input_audio_buffer.committed",
                "event_id": _event_id(),
                "item_id": item.id,
                "previous_item_id": self.previous_item_id,
            }
        )
        self.previous_item_id = item.id
        future = item.handle.finish()
        future.add_done_callback(lambda f: self.loop.call_soon_threadsafe(self._progress.put_nowait, ("done", item, f)))

    def _clear(self, event: dict[str, Any]) -> None:
        if self.item is not None:
            self.item.handle.cancel()
            self.item = None
        if self._recent is not None:
            self._recent.take_since(self.position)
        self.send({"type": "input_audio_buffer.cleared", "event_id": _event_id()})

    # -- progress from the model thread --------------------------------------------------

    async def _forward_progress(self) -> None:
        while True:
            kind, item, value = await self._progress.get()
            try:
                if kind == "partial":
                    self._delta(item, value, final=False)
                else:
                    self._completed(item, value)
            except Exception:  # a bug here must not end the session's other items
                log.exception("could not forward the progress of %s", item.id)

    def _delta(self, item: Item, partial: Transcript, *, final: bool) -> None:
        text = partial.text
        delta = text[len(item.sent_text) :] if text.startswith(item.sent_text) else ""
        settled = partial.words if final else partial.words[:-1]
        words = settled[item.sent_words :]
        if not delta and not words:
            return
        item.sent_text += delta
        item.sent_words = max(item.sent_words, len(settled))
        self.send(
            {
                "type": "conversation.item.input_audio_transcription.delta",
                "event_id": _event_id(),
                "item_id": item.id,
                "content_index": 0,
                "delta": delta,
                "earmark": {
                    "decoded_s": round(partial.duration_s, 3),
                    "audio_end_s": round(item.start_s + partial.duration_s, 3),
                    "words": [_word(w, item.start_s) for w in words],
                    "langs": [s.lang for s in partial.sentences],
                },
            }
        )

    def _completed(self, item: Item, future: Any) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.warning("item %s failed: %s", item.id, exc)
            self.send(
                {
                    "type": "conversation.item.input_audio_transcription.failed",
                    "event_id": _event_id(),
                    "item_id": item.id,
                    "content_index": 0,
                    "error": {"type": "server_error", "code": "server_error", "message": str(exc)},
                }
            )
            return
        t: Transcript = future.result()
        self._delta(item, t, final=True)
        self.send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "event_id": _event_id(),
                "item_id": item.id,
                "content_index": 0,
                "transcript": t.text,
                "earmark": {
                    "text_raw": t.text_raw,
                    "language": t.lang_detected,
                    "lang_requested": t.lang_requested,
                    "start_s": round(item.start_s, 3),
                    "duration_s": round(t.duration_s, 3),
                    "confidence": t.confidence,
                    "sentences": [
                        {
                            "text": s.text,
                            "lang": s.lang,
                            "start": round(item.start_s + s.start_s, 3),
                            "end": round(item.start_s + s.end_s, 3),
                            "confidence": s.confidence,
                        }
                        for s in t.sentences
                    ],
                    "words": [_word(w, item.start_s) for w in t.words],
                    "att_context": list(t.att_context),
                    "model_id": t.model_id,
                },
            }
        )


def _word(w: Any, offset_s: float) -> dict[str, Any]:
    return {
        "word": w.word,
        "start": round(offset_s + w.start_s, 3),
        "end": round(offset_s + w.end_s, 3),
        "confidence": w.confidence,
    }


def _obj(parent: dict[str, Any], key: str, param: str) -> dict[str, Any]:
    value = parent.get(key, {})
    if not isinstance(value, dict):
        raise ProtocolError("invalid_event", f"{param} must be an object", param=param)
    return value

"""The HTTP and WebSocket routes of the online API, as one FastAPI app over a :class:`Runtime`.

The routes are thin: they check the key and the request, then call the file transcriber
(:mod:`serve.files`), the realtime protocol (:mod:`serve.realtime`) and the transcript renderer
(:mod:`records.transcripts`). Every error is OpenAI's envelope ``{"error": {message, type, param,
code}}`` with a 4xx status and a message that says what to change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from serve.files import FileTranscriber
from serve.realtime import CLOSE_NORMAL, CLOSE_TRY_AGAIN, RealtimeSession, error_event
from serve.runtime import Runtime

log = logging.getLogger(__name__)

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def make_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="earmark",
        summary="Speech to text: OpenAI-compatible transcription and realtime streaming",
        docs_url="/docs",
        redoc_url=None,
    )
    settings = runtime.settings
    files = FileTranscriber(runtime)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    def check_key(request: Request) -> None:
        if not runtime.keys.allows(runtime.keys.key_of(request.headers.get("authorization"))):
            raise ApiError(
                401,
                "a valid API key is required: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                kind="authentication_error",
            )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def try_it() -> HTMLResponse:
        page = resources.files("serve").joinpath("static/index.html").read_text()
        return HTMLResponse(page)

    @app.get("/healthz", include_in_schema=False)
    async def health() -> dict[str, Any]:
        return {"ok": True, "model": runtime.info.model_id, "sessions": runtime.sessions}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [model_card(runtime)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        check_key(request)
        card = model_card(runtime)
        if model_id not in (card["id"], runtime.info.name):
            raise ApiError(404, f"no model {model_id!r} here; this server serves {card['id']}", code="model_not_found")
        return card

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        check_key(request)
        length = request.headers.get("content-length")
        limit = int(settings.max_file_mb * 1024 * 1024)
        if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
            raise _too_large(settings.max_file_mb)
        try:
            form = await request.form(max_part_size=limit + 1)
        except Exception as exc:  # starlette raises several types for a bad or oversized body
            if "maximum" in str(exc).lower() or "exceeded" in str(exc).lower():
                raise _too_large(settings.max_file_mb) from None
            raise ApiError(
                400,
                f"could not read the multipart form ({exc}); send multipart/form-data with a 'file' field",
                param="file",
            ) from None
        return await _transcribe(runtime, files, form)

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await _realtime(runtime, ws)

    return app


def model_card(runtime: Runtime) -> dict[str, Any]:
    info = runtime.info
    return {
        "id": info.model_id,
        "object": "model",
        "created": int(runtime.started_at),
        "owned_by": "earmark",
        "earmark": {
            "model_id": info.model_id,
            "name": info.name,
            "sha256": info.sha256,
            "locales": list(info.locales),
            "att_context_sizes": [list(a) for a in info.att_context_sizes],
            "default_att_context": list(info.default_att_context),
            "sample_rate": info.sample_rate,
            "device": runtime.engine.device,
        },
    }


def _too_large(limit_mb: float) -> ApiError:
    return ApiError(
        413,
        f"the file is larger than this server's limit of {limit_mb:g} MB; cut it into parts "
        "or transcribe it with `earmark transcribe`",
        code="file_too_large",
        param="file",
    )


async def _transcribe(runtime: Runtime, files: FileTranscriber, form: Any) -> Response:
    from records.transcripts import RecordingTranscript, render, to_verbose_json

    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "send the audio as a multipart file field named 'file'", param="file")
    fmt = str(form.get("response_format") or "json")
    if fmt not in FORMATS:
        raise ApiError(
            400,
            f"response_format {fmt!r}: use one of {', '.join(FORMATS)}",
            param="response_format",
            code="invalid_value",
        )
    granularities = [str(g) for g in form.getlist("timestamp_granularities[]")] or list(GRANULARITIES)
    bad = [g for g in granularities if g not in GRANULARITIES]
    if bad:
        raise ApiError(
            400,
            f"timestamp_granularities[] {bad[0]!r}: use word and/or segment",
            param="timestamp_granularities[]",
            code="invalid_value",
        )
    try:
        lang = runtime.resolve_language(_text(form.get("language")))
    except ValueError as exc:
        raise ApiError(400, str(exc), param="language", code="unsupported_language") from None
    try:
        att = runtime.resolve_att_context(_text(form.get("att_context")))
    except ValueError as exc:
        raise ApiError(400, str(exc), param="att_context", code="invalid_latency_mode") from None
    stream = (_text(form.get("stream")) or "false").lower() in ("true", "1", "yes")
    data = await upload.read()
    if len(data) > runtime.settings.max_file_mb * 1024 * 1024:
        raise _too_large(runtime.settings.max_file_mb)
    if not data:
        raise ApiError(400, "the file is empty; send an audio file", param="file", code="invalid_audio")
    from asr.audio import AudioError

    try:
        duration_s, parts = await files.parts_of(data)
    except (AudioError, ValueError) as exc:
        name = upload.filename or "the file"
        raise ApiError(
            400,
            f"{name}: could not decode the audio ({exc}); send a file FFmpeg can read (wav, flac, "
            "mp3, ogg, m4a, webm, ...)",
            param="file",
            code="invalid_audio",
        ) from None
    source = upload.filename or "upload"
    usage = {"type": "duration", "seconds": round(duration_s, 3)}
    if stream:
        return StreamingResponse(
            _events(files, parts, lang, att, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    transcripts = await files.transcribe(parts, lang=lang, att_context=att)
    recording = RecordingTranscript.from_parts(
        source,
        [(offset, t) for (offset, _), t in zip(parts, transcripts, strict=True)],
        offset_s=0.0,
        duration_s=duration_s,
    )
    if fmt == "json":
        return JSONResponse({"text": recording.text, "usage": usage})
    if fmt == "verbose_json":
        body = to_verbose_json(recording)
        if "word" not in granularities:
            body.pop("words", None)
        if "segment" not in granularities:
            body.pop("segments", None)
        body["usage"] = usage
        body["model"] = runtime.info.model_id
        return JSONResponse(body)
    media = "text/vtt" if fmt == "vtt" else "text/plain"
    return PlainTextResponse(render(recording, fmt), media_type=media)


async def _events(
    files: FileTranscriber, parts: list, lang: str, att: tuple[int, int], usage: dict
) -> AsyncIterator[str]:
    """Server-sent events: one append-only delta per part as it is decoded, then the whole text."""
    text = ""
    async for _, transcript in files.transcribe_in_order(parts, lang=lang, att_context=att):
        piece = transcript.text.strip()
        if not piece:
            continue
        delta = piece if not text else " " + piece
        text += delta
        yield "data: " + json.dumps({"type": "transcript.text.delta", "delta": delta}, ensure_ascii=False) + "\n\n"
    yield (
        "data: "
        + json.dumps({"type": "transcript.text.done", "text": text, "usage": usage}, ensure_ascii=False)
        + "\n\n"
    )


def _text(value: Any) -> str | None:
    return None if value is None or not isinstance(value, str) else value


async def _realtime(runtime: Runtime, ws: WebSocket) -> None:
    """One realtime session: admission (key, session cap), then events until the client leaves or a limit."""
    settings = runtime.settings
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    if not runtime.keys.allows(runtime.keys.key_of(ws.headers.get("authorization"), offered)):
        await _deny(ws)
        return
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
    if runtime.sessions >= settings.max_sessions:
        await ws.send_text(
            json.dumps(
                error_event(
                    "too_many_sessions",
                    f"this replica has its {settings.max_sessions} sessions open; try again later (or add replicas)",
                    kind="server_error",
                )
            )
        )
        await ws.close(code=CLOSE_TRY_AGAIN, reason="too many sessions")
        return
    runtime.sessions += 1
    outgoing: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    session = RealtimeSession(runtime, outgoing.put_nowait)
    writer = asyncio.ensure_future(_write(ws, outgoing))
    close_code, reason = CLOSE_NORMAL, ""
    try:
        outgoing.put_nowait(session.created())
        deadline = time.monotonic() + settings.max_session_s
        while True:
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(ws.receive(), timeout=min(settings.idle_timeout_s, max(left, 0.001)))
            except TimeoutError:
                expired = time.monotonic() >= deadline
                code = "session_expired" if expired else "idle_timeout"
                text = (
                    f"the session reached its limit of {settings.max_session_s:g} s; open a new one"
                    if expired
                    else f"no event for {settings.idle_timeout_s:g} s; the session is closed (send audio, or reconnect)"
                )
                outgoing.put_nowait(error_event(code, text, kind="invalid_request_error"))
                reason = code
                break
            if message["type"] == "websocket.disconnect":
                break
            payload = message.get("text")
            if payload is None:
                payload = message.get("bytes") or b""
            session.handle(payload)
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("realtime session failed")
        outgoing.put_nowait(
            error_event("server_error", "the server failed on this session; reconnect", kind="server_error")
        )
        reason = "server error"
    finally:
        runtime.sessions -= 1
        await session.close()
        outgoing.put_nowait(None)
        await writer
        if ws.client_state == WebSocketState.CONNECTED:
            try:
                await ws.close(code=close_code, reason=reason)
            except RuntimeError:  # already closing
                pass


async def _write(ws: WebSocket, outgoing: asyncio.Queue[dict[str, Any] | None]) -> None:
    """The one writer of a socket: events in order; a gone client ends it quietly."""
    while True:
        event = await outgoing.get()
        if event is None:
            return
        try:
            await ws.send_text(json.dumps(event, ensure_ascii=False))
        except (WebSocketDisconnect, RuntimeError, OSError):
            # the client left: keep draining so that producers never block
            while (await outgoing.get()) is not None:
                pass
            return


async def _deny(ws: WebSocket) -> None:
    """Refuse a handshake without a valid key: HTTP 401 where the server supports it, else close 1008."""
    body = json.dumps(
        {
            "error": {
                "message": "a valid API key is required: send 'Authorization: Bearer KEY' (or the "
                "subprotocol openai-insecure-api-key.KEY)",
                "type": "authentication_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    )
    try:
        await ws.send_denial_response(Response(body, status_code=401, media_type="application/json"))
    except RuntimeError:
        await ws.close(code=1008, reason="invalid api key")

"""The review web app: a JSON API and one page (plain HTML/CSS/JS in ``labeling/static``).

    earmark review --db sqlite:///review.db --project calls-2026   # http://127.0.0.1:8600

Every route but sign-in needs a session: an HttpOnly, SameSite=Strict cookie holding the
reviewer id and an expiry, signed with HMAC-SHA256. A revoked reviewer's cookie stops working at
once (the reviewer is checked on every request). Audio is served by clip id only: the clip's
source and segment come from the database, never from the client.
"""

import base64
import csv
import hashlib
import hmac
import io
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError

from labeling.db import connection_failed
from labeling.queue import FLAGS, QueueError, ReviewQueue, TaskView

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
COOKIE = "earmark_session"
#: Largest JSON body the API reads (a Label Studio import may be big; everything else is small).
MAX_BODY = 256 * 1024
MAX_IMPORT_BODY = 32 * 1024 * 1024
SHORTCUTS = {
    "Ctrl+Space / Alt+P": "play / pause",
    "Alt+R": "replay from the start",
    "Alt+, / Alt+.": "slower / faster",
    "Ctrl+Enter": "submit and next",
    "Alt+S": "skip",
    "Alt+B": "back to the previous task",
    "Alt+F": "next flag (toggle with Alt+Space)",
    "Alt+L": "language selector",
}


@dataclass
class Settings:
    """The app's settings, validated by the CLI and passed in (nothing global)."""

    db: str
    project: str
    locales: list[str] = field(default_factory=list)
    session_hours: float = 12.0
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    lease_s: float = 900.0
    secure_cookies: bool = False
    #: When set, local audio is served only from under this folder.
    audio_root: str | None = None


class Login(BaseModel):
    token: str = Field(min_length=8, max_length=200)


class Submit(BaseModel):
    text: str = Field(max_length=20_000)
    lang: str | None = Field(default=None, max_length=16)
    flags: list[str] = Field(default_factory=list, max_length=len(FLAGS))


class NextTask(BaseModel):
    lang: str | None = Field(default=None, max_length=16)


class Reassign(BaseModel):
    reviewer: str = Field(min_length=1, max_length=200)


@dataclass(frozen=True)
class Who:
    id: int
    name: str
    role: str


def create_app(settings: Settings, queue: ReviewQueue | None = None) -> FastAPI:
    queue = queue or ReviewQueue.connect(settings.db)
    app = FastAPI(title="earmark review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.queue = settings, queue

    @app.exception_handler(DBAPIError)
    async def database_down(request: Request, exc: DBAPIError) -> Response:
        """The database out of reach (restarting, a dropped connection): 503, never a 500 with a
        traceback. Nothing was written, so the client sends the same request again; the pool
        checks connections before use (pre-ping) and recovers when the server is back."""
        if not connection_failed(exc):
            raise exc
        log.warning("review database unreachable during %s %s: %s", request.method, request.url.path, exc.orig)
        return JSONResponse(
            {"detail": "the review database is unreachable right now; nothing was saved, try again in a few seconds"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        limit = MAX_IMPORT_BODY if request.url.path.startswith("/api/admin/labelstudio") else MAX_BODY
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return JSONResponse({"detail": f"request body over {limit // 1024} KiB; send less"}, status_code=413)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = "default-src 'self'; media-src 'self' blob:; img-src 'self' data:"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def who(request: Request) -> Who:
        cookie = request.cookies.get(COOKIE)
        reviewer_id = read_session(cookie, settings.secret) if cookie else None
        if reviewer_id is None:
            raise HTTPException(401, "sign in first (your session is missing or expired)")
        reviewer = next((r for r in queue.reviewers() if r.id == reviewer_id and r.active), None)
        if reviewer is None:
            raise HTTPException(401, "this reviewer was revoked; ask an admin for a new token")
        return Who(reviewer.id, reviewer.name, reviewer.role)

    def admin(user: Annotated[Who, Depends(who)]) -> Who:
        if user.role != "admin":
            raise HTTPException(403, "admins only")
        return user

    User = Annotated[Who, Depends(who)]
    Admin = Annotated[Who, Depends(admin)]

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", include_in_schema=False)
    def health() -> dict[str, str]:
        """For load balancers and Kubernetes probes: 200 while the database answers (503 otherwise,
        through the unreachable-database handler)."""
        queue.projects()
        return {"status": "ok"}

    @app.post("/api/login")
    def login(body: Login, response: Response) -> dict[str, str]:
        reviewer = queue.authenticate(body.token)
        if reviewer is None:
            raise HTTPException(401, "unknown or revoked token")
        expires = int(time.time() + settings.session_hours * 3600)
        response.set_cookie(
            COOKIE,
            make_session(reviewer.id, expires, settings.secret),
            max_age=int(settings.session_hours * 3600),
            httponly=True,
            samesite="strict",
            secure=settings.secure_cookies,
        )
        return {"name": reviewer.name, "role": reviewer.role}

    @app.post("/api/logout")
    def logout(response: Response) -> dict[str, bool]:
        response.delete_cookie(COOKIE)
        return {"ok": True}

    @app.get("/api/me")
    def me(user: User) -> dict[str, Any]:
        return {
            "name": user.name, "role": user.role, "project": settings.project, "locales": settings.locales,
            "flags": list(FLAGS), "shortcuts": SHORTCUTS,
        }  # fmt: skip

    @app.post("/api/tasks/next")
    def next_task(body: NextTask, user: User) -> Response:
        task = queue.claim(settings.project, user.id, lang=body.lang or None, lease_s=settings.lease_s)
        return Response(status_code=204) if task is None else JSONResponse(task_json(task))

    @app.post("/api/tasks/back")
    def back(user: User) -> Response:
        task = queue.take_back(settings.project, user.id, lease_s=settings.lease_s)
        return Response(status_code=204) if task is None else JSONResponse(task_json(task))

    @app.post("/api/tasks/{task_id}/submit")
    def submit(task_id: int, body: Submit, user: User) -> dict[str, bool]:
        if body.lang and settings.locales and body.lang not in settings.locales:
            raise HTTPException(
                422, f"language {body.lang!r} is not a locale of the model: {', '.join(settings.locales)}"
            )
        return queue_action(queue.submit, task_id, user.id, text=body.text.strip(), lang=body.lang, flags=body.flags)

    @app.post("/api/tasks/{task_id}/skip")
    def skip(task_id: int, user: User) -> dict[str, bool]:
        return queue_action(queue.skip, task_id, user.id)

    @app.post("/api/tasks/{task_id}/release")
    def release(task_id: int, user: User) -> dict[str, bool]:
        return queue_action(queue.release, task_id, user.id)

    @app.get("/api/clips/{clip_id}/audio")
    def audio(clip_id: str, user: User) -> Response:
        if not clip_id.isalnum() or len(clip_id) > 64:
            raise HTTPException(404, "no such clip")
        clip = queue.clip(settings.project, clip_id)
        if clip is None:
            raise HTTPException(404, "no such clip")
        if settings.audio_root and not clip.source_uri.startswith("s3://"):
            if not Path(clip.source_uri).resolve().is_relative_to(settings.audio_root):
                raise HTTPException(403, f"clip {clip_id} lies outside the served audio root")
        try:
            data = clip_wav(clip.source_uri, clip.offset_s, clip.duration_s)
        except Exception as exc:  # noqa: BLE001 - a missing or broken source is the clip's problem, said plainly
            raise HTTPException(422, f"the audio of clip {clip_id} cannot be read: {exc}") from None
        return Response(data, media_type="audio/wav", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/progress")
    def progress(user: User) -> dict[str, Any]:
        return queue.progress(settings.project)

    @app.get("/api/admin/reviews.json")
    def reviews_json(user: Admin) -> list[dict[str, Any]]:
        return queue.reviews_table(settings.project)

    @app.get("/api/admin/reviews.csv")
    def reviews_csv(user: Admin) -> Response:
        rows = queue.reviews_table(settings.project)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["review_id"])
        writer.writeheader()
        writer.writerows(rows)
        return Response(
            buf.getvalue(), media_type="text/csv", headers={"Content-Disposition": "attachment; filename=reviews.csv"}
        )

    @app.post("/api/admin/tasks/{task_id}/reopen")
    def reopen(task_id: int, user: Admin) -> dict[str, bool]:
        return queue_action(queue.reopen, task_id, user.id)

    @app.post("/api/admin/tasks/{task_id}/reassign")
    def reassign(task_id: int, body: Reassign, user: Admin) -> dict[str, bool]:
        target = next((r for r in queue.reviewers() if r.name == body.reviewer and r.active), None)
        if target is None:
            raise HTTPException(422, f"no active reviewer named {body.reviewer!r}")
        return queue_action(queue.reassign, task_id, user.id, target.id, lease_s=settings.lease_s)

    @app.get("/api/admin/labelstudio/export")
    def labelstudio_export(request: Request, user: Admin) -> list[dict[str, Any]]:
        from labeling.labelstudio import to_labelstudio

        return to_labelstudio(queue, settings.project, audio_url=str(request.base_url) + "api/clips/{clip_id}/audio")

    @app.post("/api/admin/labelstudio/import")
    async def labelstudio_import(request: Request, user: Admin) -> dict[str, int]:
        from labeling.labelstudio import LabelStudioError, from_labelstudio

        try:
            payload = json.loads(await request.body())
        except ValueError:
            raise HTTPException(400, "the body is not JSON; upload Label Studio's JSON export") from None
        try:
            return from_labelstudio(queue, settings.project, payload, reviewer_id=user.id)
        except LabelStudioError as exc:
            raise HTTPException(422, str(exc)) from None

    return app


def queue_action(action: Callable[..., None], *args: Any, **kwargs: Any) -> dict[str, bool]:
    """Run a queue operation for a route: ``{"ok": true}``, or 409 with the queue's message."""
    try:
        action(*args, **kwargs)
    except QueueError as exc:
        raise HTTPException(409, str(exc)) from None
    return {"ok": True}


def task_json(task: TaskView) -> dict[str, Any]:
    out = asdict(task)
    out["lease_expires_at"] = task.lease_expires_at.isoformat() if task.lease_expires_at else None
    return out


def make_session(reviewer_id: int, expires: int, secret: bytes) -> str:
    payload = f"{reviewer_id}.{expires}"
    sig = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{base64.urlsafe_b64encode(sig).decode().rstrip('=')}"


def read_session(cookie: str, secret: bytes) -> int | None:
    """The reviewer id of a valid, unexpired session cookie; None otherwise."""
    try:
        reviewer, expires, sig = cookie.split(".")
        want = base64.urlsafe_b64encode(hmac.new(secret, f"{reviewer}.{expires}".encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(want.decode().rstrip("="), sig) or int(expires) < time.time():
            return None
        return int(reviewer)
    except ValueError:
        return None


def clip_wav(source_uri: str, offset_s: float, duration_s: float | None) -> bytes:
    """The clip's segment as 16 kHz mono 16-bit WAV, decoded by earmark's one audio decoder."""
    import soundfile as sf

    from asr.audio import decode_audio  # the project's decoder (numpy, soundfile, PyAV; no torch or NeMo)
    from cluster.storage import is_remote, read_bytes

    source: Any = read_bytes(source_uri) if is_remote(source_uri) else Path(source_uri)
    audio = decode_audio(source, offset_s=offset_s, duration_s=duration_s)
    buf = io.BytesIO()
    sf.write(buf, audio, 16_000, format="WAV", subtype="PCM_16")
    return buf.getvalue()

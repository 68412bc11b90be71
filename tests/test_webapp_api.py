"""The review app's JSON API: sessions, roles, audio by clip id only, bad bodies, Label Studio."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from labeling.webapp import COOKIE, Settings, create_app, make_session
from tests.reviewdata import make_project

LOCALES = ["de-DE", "en-US", "es-ES", "fr-FR"]


@pytest.fixture()
def app_env(tmp_path: Path, corpus):
    url, queue = make_project(tmp_path, corpus)
    ana, ana_token = queue.add_reviewer("ana")
    ben, ben_token = queue.add_reviewer("ben")
    boss, boss_token = queue.add_reviewer("boss", role="admin")
    settings = Settings(db=url, project="demo", locales=LOCALES)
    app = create_app(settings, queue)
    return app, settings, queue, {"ana": ana_token, "ben": ben_token, "boss": boss_token}


def client_for(app, token: str | None = None) -> TestClient:
    client = TestClient(app)
    if token:
        assert client.post("/api/login", json={"token": token}).status_code == 200
    return client


ROUTES = [
    ("get", "/api/me", None),
    ("post", "/api/tasks/next", {}),
    ("post", "/api/tasks/back", None),
    ("post", "/api/tasks/1/submit", {"text": "x"}),
    ("post", "/api/tasks/1/skip", None),
    ("post", "/api/tasks/1/release", None),
    ("get", "/api/clips/c0001/audio", None),
    ("get", "/api/progress", None),
    ("get", "/api/admin/reviews.json", None),
    ("get", "/api/admin/reviews.csv", None),
    ("post", "/api/admin/tasks/1/reopen", None),
    ("post", "/api/admin/tasks/1/reassign", {"reviewer": "ana"}),
    ("get", "/api/admin/labelstudio/export", None),
    ("post", "/api/admin/labelstudio/import", []),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_rejects_missing_forged_and_expired_sessions(app_env, method, path, body) -> None:
    app, settings, queue, tokens = app_env
    client = TestClient(app)
    kwargs = {"json": body} if body is not None else {}
    missing = getattr(client, method)(path, **kwargs)
    assert missing.status_code == 401 and "sign in" in missing.json()["detail"]
    ana = next(r for r in queue.reviewers() if r.name == "ana")
    for cookie in (
        make_session(ana.id, int(time.time()) - 5, settings.secret),  # expired
        make_session(ana.id, int(time.time()) + 3600, b"not the secret"),  # forged
        "garbage",
    ):
        client.cookies.set(COOKIE, cookie)
        assert getattr(client, method)(path, **kwargs).status_code == 401


def test_admin_routes_refuse_reviewers(app_env) -> None:
    app, _, _, tokens = app_env
    ana = client_for(app, tokens["ana"])
    for path in ("/api/admin/reviews.json", "/api/admin/reviews.csv", "/api/admin/labelstudio/export"):
        response = ana.get(path)
        assert response.status_code == 403 and response.json()["detail"] == "admins only"


def test_a_wrong_token_gets_401_and_a_revoked_reviewer_loses_the_session(app_env) -> None:
    app, _, queue, tokens = app_env
    assert TestClient(app).post("/api/login", json={"token": "wrong-token-123"}).status_code == 401
    ana = client_for(app, tokens["ana"])
    assert ana.get("/api/me").status_code == 200
    cookie = ana.cookies.get(COOKIE)
    queue.revoke_reviewer("ana")
    ana.cookies.set(COOKIE, cookie)
    assert ana.get("/api/me").status_code == 401


def test_the_session_cookie_is_httponly_and_samesite(app_env) -> None:
    app, _, _, tokens = app_env
    response = TestClient(app).post("/api/login", json={"token": tokens["ana"]})
    header = response.headers["set-cookie"].lower()
    assert "httponly" in header and "samesite=strict" in header


def test_audio_is_served_by_clip_id_only(app_env, corpus) -> None:
    app, _, queue, tokens = app_env
    ana = client_for(app, tokens["ana"])
    response = ana.get("/api/clips/c0001/audio")
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    audio, rate = sf.read(io.BytesIO(response.content))
    clip = queue.clip("demo", "c0001")
    assert rate == 16_000 and len(audio) / rate == pytest.approx(clip.duration_s, abs=0.02)
    for bad in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "/etc/passwd", "c0001%00", "nope"):
        response = ana.get(f"/api/clips/{bad}/audio")
        assert response.status_code == 404, bad
        assert b"root:" not in response.content


def test_audio_outside_the_audio_root_is_refused(app_env, tmp_path: Path) -> None:
    app, settings, queue, tokens = app_env
    settings.audio_root = str(tmp_path / "elsewhere")
    ana = client_for(app, tokens["ana"])
    assert ana.get("/api/clips/c0001/audio").status_code == 403


def test_oversized_and_malformed_bodies_get_4xx_with_a_message(app_env) -> None:
    app, _, _, tokens = app_env
    ana = client_for(app, tokens["ana"])
    task = ana.post("/api/tasks/next", json={}).json()
    big = ana.post(
        f"/api/tasks/{task['id']}/submit", content=b"x" * 400_000, headers={"content-type": "application/json"}
    )
    assert big.status_code == 413 and "KiB" in big.json()["detail"]
    broken = ana.post(
        f"/api/tasks/{task['id']}/submit", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422 and broken.json()["detail"]
    wrong = ana.post(f"/api/tasks/{task['id']}/submit", json={"text": 5, "flags": "x"})
    assert wrong.status_code == 422
    lang = ana.post(f"/api/tasks/{task['id']}/submit", json={"text": "Hola.", "lang": "xx-XX"})
    assert lang.status_code == 422 and "not a locale" in lang.json()["detail"]
    flag = ana.post(f"/api/tasks/{task['id']}/submit", json={"text": "Hola.", "flags": ["loud"]})
    assert flag.status_code == 409 and "unknown flags" in flag.json()["detail"]
    assert ana.post("/api/tasks/999999/skip").status_code == 409


def test_reviewers_get_different_tasks_and_submitting_moves_on(app_env) -> None:
    app, _, queue, tokens = app_env
    ana, ben = client_for(app, tokens["ana"]), client_for(app, tokens["ben"])
    a1 = ana.post("/api/tasks/next", json={}).json()
    b1 = ben.post("/api/tasks/next", json={}).json()
    assert a1["id"] != b1["id"]
    assert ben.post(f"/api/tasks/{a1['id']}/submit", json={"text": "mine"}).status_code == 409
    assert ana.post(f"/api/tasks/{a1['id']}/submit", json={"text": "Hola amigo.", "lang": "es-ES"}).status_code == 200
    a2 = ana.post("/api/tasks/next", json={}).json()
    assert a2["id"] not in (a1["id"], b1["id"])
    back = ana.post("/api/tasks/back").json()
    assert back["id"] == a1["id"]  # the back button reopens her last task for her


def test_progress_and_review_downloads(app_env) -> None:
    app, _, _, tokens = app_env
    ana, boss = client_for(app, tokens["ana"]), client_for(app, tokens["boss"])
    task = ana.post("/api/tasks/next", json={}).json()
    ana.post(f"/api/tasks/{task['id']}/submit", json={"text": "Hola.", "lang": "es-ES"})
    progress = ana.get("/api/progress").json()
    assert progress["reviewers"]["ana"]["submits"] == 1
    assert sum(c.get("done", 0) for c in progress["tasks"].values()) == 1
    rows = boss.get("/api/admin/reviews.json").json()
    assert [r["action"] for r in rows] == ["claim", "submit"] and rows[1]["text_after"] == "Hola."
    csv_text = boss.get("/api/admin/reviews.csv").text
    assert csv_text.splitlines()[0].startswith("review_id,") and "Hola." in csv_text
    assert boss.post(f"/api/admin/tasks/{task['id']}/reopen").status_code == 200
    assert boss.post(f"/api/admin/tasks/{task['id']}/reassign", json={"reviewer": "ben"}).status_code == 200
    assert boss.post(f"/api/admin/tasks/{task['id']}/reassign", json={"reviewer": "nobody"}).status_code == 422


def test_label_studio_export_and_import_round_trip(app_env) -> None:
    app, _, queue, tokens = app_env
    boss = client_for(app, tokens["boss"])
    tasks = boss.get("/api/admin/labelstudio/export").json()
    assert len(tasks) == 8
    first = tasks[0]
    assert first["data"]["audio"].endswith(f"/api/clips/{first['data']['clip_id']}/audio")
    prediction = first["predictions"][0]
    assert prediction["score"] == pytest.approx(0.05) and prediction["result"][0]["type"] == "textarea"
    exported = [
        {
            "id": k,
            "data": t["data"],
            "annotations": [
                {"id": 100 + k, "completed_by": {"email": "ls@example.com"}, "result": [
                    {"from_name": "transcription", "to_name": "audio", "type": "textarea", "value": {"text": [f"fixed {k}"]}}
                ]}  # fmt: skip
            ],
        }
        for k, t in enumerate(tasks[:3])
    ] + [{"id": 9, "data": {"clip_id": "unknown"}, "annotations": [{"result": [
        {"from_name": "transcription", "type": "textarea", "value": {"text": ["x"]}}]}]}]  # fmt: skip
    result = boss.post("/api/admin/labelstudio/import", json=exported).json()
    assert result == {"imported": 3, "skipped": 0, "unknown_clips": 1}
    reviews = [r for r in boss.get("/api/admin/reviews.json").json() if r["action"] == "submit"]
    assert sorted(r["text_after"] for r in reviews) == ["fixed 0", "fixed 1", "fixed 2"]
    assert "ls@example.com" in reviews[0]["note"]
    assert boss.post("/api/admin/labelstudio/import", content=b"nope").status_code == 400
    assert boss.post("/api/admin/labelstudio/import", json={"a": 1}).status_code == 422

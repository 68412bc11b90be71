"""A fresh PostgreSQL database per test session, on the machine's server (pytest plugin).

The server is the one on 127.0.0.1:5432 that ``scripts/postgres.sh`` found or started (it writes
the admin URL to ``.venv/earmark-test-pg.url``; ``EARMARK_TEST_PG`` overrides it). Where no
server answers, the PostgreSQL tests skip, except when ``EARMARK_REQUIRE_POSTGRES=1`` (set by
``make test``, so CI never skips them silently).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_URL_FILE = Path(__file__).resolve().parents[1] / ".venv" / "earmark-test-pg.url"
ADMIN_URL = os.environ.get("EARMARK_TEST_PG") or (
    _URL_FILE.read_text().strip() if _URL_FILE.exists() else "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin_connect():
    import psycopg

    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of an empty database, dropped at the end of the session."""
    try:
        admin = _admin_connect()
    except Exception as exc:  # noqa: BLE001 - any failure to reach the server means: no PostgreSQL here
        if os.environ.get("EARMARK_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required (EARMARK_REQUIRE_POSTGRES=1) but {ADMIN_URL} does not answer: {exc}")
        pytest.skip(f"no PostgreSQL at {ADMIN_URL}: {exc}")
    name = f"earmark_test_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with _admin_connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

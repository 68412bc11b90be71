"""A fresh PostgreSQL database per test session, on the machine's server (pytest plugin).

The server is the one on 127.0.0.1:5432 that ``scripts/postgres.sh`` found or started (it writes
the admin URL to ``.venv/earmark-test-pg.url``; ``EARMARK_TEST_PG`` overrides it). Where no
server answers, the PostgreSQL tests skip, except when ``EARMARK_REQUIRE_POSTGRES=1`` (set by
``make test``, so CI never skips them silently).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

_URL_FILE = Path(__file__).resolve().parents[1] / ".venv" / "earmark-test-pg.url"
ADMIN_URL = os.environ.get("EARMARK_TEST_PG") or (
    _URL_FILE.read_text().strip() if _URL_FILE.exists() else "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin_connect():
    import psycopg

    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """URL of an empty database of one test's own (never migrated), dropped after it."""
    with _database() as url:
        yield url


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of an empty database, dropped at the end of the session."""
    with _database() as url:
        yield url


@contextmanager
def _database() -> Iterator[str]:
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


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of one test's own, which the test may stop and start (an outage)."""

    bin: Path
    data: Path
    port: int
    as_postgres: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_postgres, str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args],
            check=True,
            capture_output=True,
            timeout=90,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-l", str(self.data / "server.log"), "-o", options, "start")

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, as in a restart of the server."""
        self._ctl("-m", "fast", "stop")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """Start a throwaway PostgreSQL cluster (Debian's ``initdb`` and ``pg_ctl``, trust auth on
    127.0.0.1 and a free port); it and its files are gone afterwards. As root, the server runs as
    the ``postgres`` user, which cannot enter pytest's private folders, so its files live in a
    folder of their own that is removed at the end."""
    import pwd

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if not found:
        pytest.fail("PostgreSQL's server binaries are not installed (scripts/postgres.sh installs them)")
    root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="earmark-pg-", dir="/tmp" if root else None))
    as_postgres: list[str] = []
    if root:
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    server = None
    try:
        data = base / "data"
        subprocess.run(
            [*as_postgres, str(found[-1].parent / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = PrivatePostgres(found[-1].parent, data, port, as_postgres)
        server.start()
        yield server
    finally:
        if server is not None:
            try:
                server.stop()
            except subprocess.SubprocessError:
                pass  # already stopped
        shutil.rmtree(base, ignore_errors=True)

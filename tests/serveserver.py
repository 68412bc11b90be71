"""A real ``earmark serve`` on loopback (embedded Ray, Serve, the demo model), as a user starts it.

>>> with EarmarkServer(["--max-sessions", "4"]) as server:     # doctest: +SKIP
...     httpx.get(server.url + "/v1/models", headers=server.headers)

The session-scoped ``served`` fixture is one server with an API key, shared by the serve tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EarmarkServer:
    """``earmark serve ARGS`` in a subprocess on a free loopback port; waits until it answers."""

    def __init__(
        self, args: list[str], *, key_file: Path | None = None, key: str | None = None, start_timeout_s: float = 180.0
    ) -> None:
        self.port = free_port()
        self.args = args
        self.key = key
        self.key_file = key_file
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def __enter__(self) -> EarmarkServer:
        import httpx

        args = [*self.args]
        if self.key_file is not None:
            args += ["--api-keys", str(self.key_file)]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"earmark-serve-{self.port}.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "serve", "--port", str(self.port), *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"earmark serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"earmark serve did not answer within {self.start_timeout_s:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path and self.log_path.exists() else ""

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> EarmarkServer:
    """One ``earmark serve --model demo`` with an API key for the whole session (small limits, so
    that the limit tests stay short)."""
    from serve.auth import append_key

    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key = append_key(key_file, "tests")
    server = EarmarkServer(
        ["--max-sessions", "4", "--idle-timeout", "6", "--max-buffer", "20", "--max-file-mb", "8"],
        key_file=key_file,
        key=key,
    )
    with server:
        yield server

"""The review app's Deployment run as written: its init container's migration, then two replicas of
its container's command against PostgreSQL, sharing the session secret from their Secret."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.infra import K8S, find, render

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def deployment_commands() -> tuple[list[str], list[str], dict[str, str]]:
    objects = render(K8S / "base")
    pod = find(objects, "Deployment", "earmark-review")["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]
    (app,) = pod["containers"]
    config = find(objects, "ConfigMap", "earmark-config")["data"]
    assert [s["secretRef"]["name"] for s in app["envFrom"] if "secretRef" in s] == ["earmark-db", "earmark-review"]
    return migrate["command"], app["command"], config


def expand(command: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container's command."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], part) for part in command]


def with_port(command: list[str], port: int) -> list[str]:
    """Each pod has its own network namespace; on one machine the replicas take a port each."""
    i = command.index("--port")
    return [*command[: i + 1], str(port), *command[i + 2 :]]


@contextmanager
def running(command: list[str], env: dict[str, str], port: int) -> Iterator[str]:
    command = [str(BIN / command[0]), *command[1:]]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{command} exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the review app did not answer /healthz within 60 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_migration_then_two_replicas_that_accept_each_others_sign_ins(fresh_pg_url: str) -> None:
    from labeling.queue import ReviewQueue

    migrate, app, config = deployment_commands()
    secret = "s" * 16 + os.urandom(16).hex()
    env = {**os.environ, **config, "EARMARK_DB": fresh_pg_url, "EARMARK_SESSION_SECRET": secret}
    command = expand(app, env)

    # the app refuses an unmigrated database with one line that says what to run
    refused = subprocess.run(
        [str(BIN / command[0]), *with_port(command, free_port())[1:]], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert refused.returncode == 3, refused.stderr
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert "earmark queue migrate" in line and "Traceback" not in refused.stderr

    # two init containers at once (two replicas starting together) migrate once, without error
    runs = [subprocess.Popen([str(BIN / migrate[0]), *migrate[1:]], env=env, stdout=subprocess.PIPE, text=True)]
    runs.append(subprocess.Popen([str(BIN / migrate[0]), *migrate[1:]], env=env, stdout=subprocess.PIPE, text=True))
    outputs = [(p.wait(timeout=120), p.stdout.read() if p.stdout else "") for p in runs]
    assert [code for code, _ in outputs] == [0, 0] and all("schema revision" in out for _, out in outputs), outputs

    queue = ReviewQueue.connect(fresh_pg_url, migrate=False)
    with queue.Session.begin() as s:
        queue.project_id(s, config["EARMARK_REVIEW_PROJECT"], create=True)
    _, token = queue.add_reviewer("ana")

    with ExitStack() as stack:
        a, b = (stack.enter_context(running(with_port(command, p), env, p)) for p in (free_port(), free_port()))
        other_env = {**env, "EARMARK_SESSION_SECRET": "x" * 40}
        port = free_port()
        other = stack.enter_context(running(with_port(expand(app, other_env), port), other_env, port))

        login = httpx.post(f"{a}/api/login", json={"token": token})
        assert login.status_code == 200, login.text
        cookie = login.headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie  # --secure-cookies, as behind the TLS ingress
        session = {"cookie": cookie.split(";", 1)[0]}
        for replica in (a, b):
            me = httpx.get(f"{replica}/api/me", headers=session)
            assert me.status_code == 200 and me.json()["name"] == "ana", me.text
        # a process with another secret (a replica of a misconfigured Deployment) signs nobody in
        assert httpx.get(f"{other}/api/me", headers=session).status_code == 401


def test_a_short_session_secret_is_refused_before_anything_starts(fresh_pg_url: str) -> None:
    _, app, config = deployment_commands()
    env = {**os.environ, **config, "EARMARK_DB": fresh_pg_url, "EARMARK_SESSION_SECRET": "short"}
    command = expand(app, env)
    out = subprocess.run([str(BIN / command[0]), *command[1:]], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "32 characters" in out.stderr, out.stderr

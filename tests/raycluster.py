"""A real multi-node Ray cluster on loopback for the tests: a head and worker nodes started with
``ray start``, each node a raylet of its own, stopped (only its own processes) afterwards.

>>> with LocalCluster(head_cpus=2) as cluster:          # doctest: +SKIP
...     worker = cluster.add_worker(cpus=2)
...     run(["earmark", "transcribe", ..., "--address", cluster.address])
...     cluster.kill_node(worker)                      # a node lost mid-job
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

import psutil

QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "NEMO_LOGGING_LEVEL": "ERROR"}


class LocalCluster:
    def __init__(self, head_cpus: int = 2, *, env: dict[str, str] | None = None, dashboard: bool = False) -> None:
        """``env``: added to every node's environment (as a pod's env would be); ``dashboard``:
        run the head's dashboard, which serves the Jobs API and ``serve deploy``, at
        :attr:`dashboard_url`."""
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = dashboard
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.head_cpus = head_cpus
        # Ray's unix sockets live under the temp folder (at most 107 bytes a path): a short one
        # of its own, removed at the end
        self.temp = Path(tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp"))
        self._ray = str(Path(sys.executable).parent / "ray")
        # RAY_AUTH_MODE: Ray 2.60's `ray start --head` may turn token authentication on while a
        # joining `ray start` assumes it off; a throwaway cluster on loopback needs none
        self.env = os.environ | QUIET_ENV | {"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"} | (env or {})

    def __enter__(self) -> LocalCluster:
        head = [
            self._ray, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.head_cpus}", f"--temp-dir={self.temp}", "--disable-usage-stats",
        ]  # fmt: skip
        if self.dashboard:
            head += [
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ]
        else:
            head += ["--include-dashboard=false"]
        try:
            subprocess.run(head, check=True, env=self.env, capture_output=True, timeout=120)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def add_worker(self, cpus: int = 2) -> psutil.Process:
        """Start a worker node; returns its raylet process (kill it to lose the node)."""
        before = {p.pid for p in self._raylets()}
        worker = [
            self._ray, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
            "--disable-usage-stats",
        ]  # fmt: skip
        subprocess.run(worker, check=True, env=self.env, capture_output=True, timeout=120)
        (raylet,) = [p for p in self._raylets() if p.pid not in before]
        return raylet

    def kill_node(self, raylet: psutil.Process) -> list[str]:
        """Lose a node at once: SIGKILL to its raylet and to every process it started (its
        workers, the model actors among them); returns the killed processes' command lines."""
        killed = []
        for proc in [raylet, *_children(raylet)]:
            try:
                killed.append(" ".join(proc.cmdline()))
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        return killed

    def stop(self) -> None:
        """Only this cluster's processes: `ray stop` would stop every Ray on the machine."""
        marks = (f":{self.port}", f"gcs_server_port={self.port}", str(self.temp))
        found = [
            p for p in psutil.process_iter(["cmdline"]) if any(m in " ".join(p.info["cmdline"] or ()) for m in marks)
        ]
        for proc in found + [c for p in found for c in _children(p)]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)

    def _raylets(self) -> list[psutil.Process]:
        return [
            p
            for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "raylet" and f":{self.port}" in " ".join(p.info["cmdline"] or ())
        ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []

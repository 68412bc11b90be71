"""Where work runs: connecting to Ray and planning actor resources.

Only entry points connect (the CLI, benchmarks, tests: :func:`connect`, or :func:`ray_session`
for a block); library code never starts Ray, and a job run without a connection says so
(:func:`require_ray`) instead of letting Ray Data start one. With no address Ray starts embedded
in the process (a laptop); ``--address`` or ``RAY_ADDRESS`` joins an existing cluster.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: glibc malloc settings for every earmark process and Ray worker (set only where the user has
#: not set them). By default glibc serves large blocks (a batch's activations and gradients) with
#: fresh ``mmap`` pages and gives freed memory back at once, so each training step or forward
#: pass faults its working set in again, zeroed page by page: measured on this 2-core VM, a
#: quarter to a half of a training step went to the kernel (76k page faults a second per worker).
#: Keeping freed memory in the process (as PyTorch's CUDA caching allocator does on the GPU) made
#: CPU training steps of the demo model 2.2x faster (7.9 s -> 3.6 s and 1.0M -> 16k page faults for
#: six steps) and transcription 1.2-1.7x (``benchmarks/allocator.py``, medians of 3). The cost: a
#: process keeps its peak memory until it exits. Both thresholds are needed: with only one of the
#: two, or with ``mallopt`` at run time (capped at 32 MB), most faults remain. One arena: the two
#: thresholds rule only glibc's main arena, and threads other than the main one allocate from
#: arenas of 64 MB heaps that map anything bigger afresh; Ray Data and Ray Train run the model in
#: such threads (the transcription actor's thread on the throughput benchmark's segments: 185k page
#: faults and 2.3 s, with one arena 0 and 2.1 s). The compute threads of one process rarely
#: allocate at once.
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
    "MALLOC_ARENA_MAX": "1",
}


def allocator_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allocator settings for this process's workers: the user's own where set (either one),
    else :data:`ALLOCATOR_ENV`; none with ``EARMARK_MALLOC=system`` or off Linux (where glibc's
    variables mean nothing)."""
    import sys

    env: Mapping[str, str] = os.environ if environ is None else environ
    if sys.platform != "linux" or env.get("EARMARK_MALLOC") == "system":
        return {}
    own = {k: env[k] for k in ALLOCATOR_ENV if k in env}
    return own or dict(ALLOCATOR_ENV)


def restart_with_allocator_env() -> None:
    """Re-execute this process with :data:`ALLOCATOR_ENV` when it lacks it (glibc reads it only at
    start). For entry points, before anything heavy is imported (costs one interpreter start)."""
    import sys

    wanted = allocator_env()
    if all(k in os.environ for k in wanted) or not getattr(sys, "orig_argv", None):
        return
    os.environ.update(wanted)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> str:
    """Start or join Ray once per process; returns where it runs (``embedded`` or the address)."""
    import ray
    import ray.data  # noqa: F401 - Ray Data sets its loggers up when first imported: before they are quieted

    address = address or os.environ.get("RAY_ADDRESS") or None
    for name in ("ray", "ray.data", "ray.train", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.WARNING)
    if ray.is_initialized():
        return address or "embedded"
    level = logging.ERROR if quiet else logging.WARNING
    kwargs: dict = {"log_to_driver": not quiet, "configure_logging": True, "logging_level": level}
    allocator = allocator_env()
    if address:
        # a cluster's workers start with the cluster's environment: this job's get the allocator's
        # (and the retry budget this command was given)
        env = allocator | {k: os.environ[k] for k in ("EARMARK_RETRY_BUDGET_S",) if k in os.environ}
        _probe(address)
        try:
            ray.init(address=address, runtime_env={"env_vars": env} if env else None, **kwargs)
        except ConnectionError as exc:
            raise ClusterUnreachableError(
                f"cannot reach the Ray cluster at {address} ({str(exc).splitlines()[0]}); check --address or "
                "RAY_ADDRESS, and that the head node is up (`ray status --address ...`)"
            ) from exc
        return address
    os.environ.update(allocator)  # the embedded cluster's workers inherit this process's environment
    # "local": a new in-process cluster, even when `ray start` left an address file behind
    # (Ray would otherwise join that cluster, or fail if it is gone)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return "embedded"


#: Longest wait for a cluster's head to answer before a job gives up (the retry budget, if shorter).
CLUSTER_PROBE_S = 60.0


def _probe(address: str) -> None:
    """Fail fast, with a message, when nothing answers at ``address`` (``host:port`` or
    ``ray://host:port``): ``ray.init`` would otherwise retry for minutes, printing warnings."""
    import socket

    from cluster import retry

    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray's own lookup
    budget = min(retry.budget_s(), CLUSTER_PROBE_S)

    def connect_once() -> None:
        socket.create_connection((host, int(port)), timeout=5).close()

    try:
        retry.call(connect_once, what=address, budget=budget)
    except OSError as exc:
        raise ClusterUnreachableError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}, for {budget:.0f} s); check --address "
            "or RAY_ADDRESS, and that the head node is up (`ray status --address ...`)"
        ) from exc


def disconnect() -> None:
    """Leave Ray (stop it when embedded) if this process joined it. Entry points call it when their
    job is done: an explicit shutdown takes ~0.3 s, while leaving it to the interpreter's exit
    took ~0.8 s more on a 2-core laptop (measured on a joined cluster)."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to leave it (``--help`` stays fast)
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> Iterator[str]:
    """Connect (:func:`connect`) for the block, and leave Ray when it ends (:func:`disconnect`)."""
    try:
        yield connect(address, num_cpus=num_cpus, quiet=quiet)
    finally:
        disconnect()


class ClusterUnreachableError(ConnectionError):
    """The Ray cluster named by ``--address``/``RAY_ADDRESS`` did not answer."""


#: Lines Ray's C++ core prints to the driver's stderr that say nothing to an earmark user. Ray
#: Data hands its actors their constructor arguments through the object store and lets them
#: restart, and the core warns about that combination at ERROR level on every job; earmark's
#: committer is what keeps output exactly once when an actor is lost.
HARMLESS_NATIVE_LINES = (re.compile(rb"has constructor arguments in the object store and max_restarts > 0"),)


@contextmanager
def filtered_native_stderr(patterns: Sequence[re.Pattern[bytes]] = HARMLESS_NATIVE_LINES) -> Iterator[None]:
    """Drop the lines matching ``patterns`` from whatever this process writes to file
    descriptor 2 during the block (Ray's C++ core writes there, below Python's ``sys.stderr``);
    everything else passes through unchanged, as soon as a line (or a progress bar's ``\\r``)
    ends. On a terminal the filter is a pseudo-terminal of the terminal's size, so that what
    draws progress bars still sees a terminal."""
    import sys
    import threading

    sys.stderr.flush()
    saved = os.dup(2)
    if os.isatty(saved):
        import fcntl
        import pty
        import termios
        import tty

        read_end, write_end = pty.openpty()
        tty.setraw(write_end)  # bytes pass as written (no \n -> \r\n)
        fcntl.ioctl(write_end, termios.TIOCSWINSZ, fcntl.ioctl(saved, termios.TIOCGWINSZ, b"\0" * 8))
    else:
        read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def keep(piece: bytes) -> bool:
        return not any(p.search(piece) for p in patterns)

    def forward(data: bytes) -> None:
        try:
            os.write(saved, data)
        except OSError:  # the block ended and a child still writes: nowhere left to write it
            pass

    def pump() -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:  # a pseudo-terminal whose last writer closed says EIO, not EOF
                chunk = b""
            if not chunk:
                break
            *pieces, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
            out = b"".join(piece for piece in pieces if keep(piece))
            if out:
                forward(out)
        if pending and keep(pending):
            forward(pending)
        os.close(read_end)

    thread = threading.Thread(target=pump, name="earmark-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes here, so the pump sees the end
        thread.join(timeout=5)
        os.close(saved)


class NotConnectedError(RuntimeError):
    """A job was started in a process that is not connected to Ray."""


def require_ray() -> None:
    """Raise :class:`NotConnectedError` unless this process is connected to Ray: jobs run on their
    caller's connection and never start one (Ray Data would otherwise start a local cluster)."""
    import ray

    if not ray.is_initialized():
        raise NotConnectedError(
            "Ray is not connected: call cluster.runtime.connect() (or run the job inside "
            "`with cluster.runtime.ray_session(address):`) first; the earmark command does this for you"
        )


@dataclass(frozen=True, slots=True)
class ActorPlan:
    """How many model actors, and what each one holds."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    #: torch threads inside a CPU actor
    threads: int | None

    def describe(self) -> str:
        kind = (
            f"{self.gpus_per_actor:g} GPU"
            if self.gpus_per_actor
            else f"{self.cpus_per_actor:g} CPU, {self.threads} threads"
        )
        return f"{self.actors} actor(s) x ({kind})"


def plan_actors(
    *,
    actors: int | None,
    gpus_per_actor: float | None,
    cluster_cpus: float,
    cluster_gpus: float,
    node_cpus: Sequence[float] = (),
) -> ActorPlan:
    """One actor per GPU by default; on CPUs one actor that keeps one core free for decoding.

    >>> plan_actors(actors=None, gpus_per_actor=None, cluster_cpus=2, cluster_gpus=0)
    ActorPlan(actors=1, gpus_per_actor=0.0, cpus_per_actor=1.0, threads=2)
    >>> plan_actors(actors=None, gpus_per_actor=None, cluster_cpus=64, cluster_gpus=8).actors
    8
    >>> plan_actors(actors=2, gpus_per_actor=None, cluster_cpus=2, cluster_gpus=0)  # a core left to decode
    ActorPlan(actors=2, gpus_per_actor=0.0, cpus_per_actor=0.5, threads=1)
    >>> plan_actors(actors=2, gpus_per_actor=None, cluster_cpus=4, cluster_gpus=0, node_cpus=[2, 2]).cpus_per_actor
    0.5
    """
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster_gpus else 0.0
    if gpus_per_actor < 0 or (actors is not None and actors < 1):
        raise ValueError("--actors must be >= 1 and --gpus-per-actor >= 0")
    if gpus_per_actor > 0 and cluster_gpus < gpus_per_actor:
        raise ValueError(
            f"--gpus-per-actor {gpus_per_actor:g} but the cluster has {cluster_gpus:g} GPUs; use --gpus-per-actor 0 for CPU actors"
        )
    if actors is None:
        actors = max(1, int(cluster_gpus // gpus_per_actor)) if gpus_per_actor else 1
    if gpus_per_actor:
        return ActorPlan(actors, float(gpus_per_actor), 1.0, None)
    # A CPU actor reserves one core in Ray's books (decoding gets the others) but computes with
    # its share of all cores: the forward pass dominates, decoding is light and bursty. When the
    # actors would book every core, they book less, so that a decode task can still be scheduled
    # (else the job waits forever for decoded audio). "Every core" is that of the smallest node
    # (of 2 cores or more) in a cluster: when nodes are lost, Ray restarts their actors on the
    # nodes left, and the lost decode outputs must still find a core to be made again.
    threads = max(1, int(cluster_cpus // actors))
    floor = min([c for c in node_cpus if c >= 2] or [cluster_cpus])
    cpus = min(1.0, (floor - 1) / actors) if floor >= 2 else 1.0
    return ActorPlan(actors, 0.0, math.floor(cpus * 1000) / 1000, threads)  # rounded down: the core stays free


if __name__ == "__main__":  # `env $(python -m cluster.runtime) CMD`: CMD with the allocator settings
    print(" ".join(f"{k}={v}" for k, v in allocator_env().items()))

"""Where work runs: connecting to Ray and planning actor resources.

Only entry points call :func:`connect` (the CLI, benchmarks, tests); library code never starts
Ray. With no address Ray starts embedded in the process (a laptop); ``--address`` or
``RAY_ADDRESS`` joins an existing cluster.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> str:
    """Start or join Ray once per process; returns where it runs (``embedded`` or the address)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    for name in ("ray", "ray.data", "ray.train", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.WARNING)
    if ray.is_initialized():
        return address or "embedded"
    level = logging.ERROR if quiet else logging.WARNING
    kwargs = {"log_to_driver": not quiet, "configure_logging": True, "logging_level": level}
    if address:
        ray.init(address=address, **kwargs)
        return address
    # "local": a new in-process cluster, even when `ray start` left an address file behind
    # (Ray would otherwise join that cluster, or fail if it is gone)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return "embedded"


def disconnect() -> None:
    """Leave Ray (stop it when embedded) if this process joined it. Entry points call it when their
    job is done: an explicit shutdown takes ~0.3 s, while leaving it to the interpreter's exit
    took ~0.8 s more on a 2-core laptop (measured on a joined cluster)."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to leave it (``--help`` stays fast)
    if ray is not None and ray.is_initialized():
        ray.shutdown()


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
    *, actors: int | None, gpus_per_actor: float | None, cluster_cpus: float, cluster_gpus: float
) -> ActorPlan:
    """One actor per GPU by default; on CPUs one actor that keeps one core free for decoding.

    >>> plan_actors(actors=None, gpus_per_actor=None, cluster_cpus=2, cluster_gpus=0)
    ActorPlan(actors=1, gpus_per_actor=0.0, cpus_per_actor=1.0, threads=2)
    >>> plan_actors(actors=None, gpus_per_actor=None, cluster_cpus=64, cluster_gpus=8).actors
    8
    >>> plan_actors(actors=2, gpus_per_actor=None, cluster_cpus=2, cluster_gpus=0)  # a core left to decode
    ActorPlan(actors=2, gpus_per_actor=0.0, cpus_per_actor=0.5, threads=1)
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
    # (else the job waits forever for decoded audio).
    threads = max(1, int(cluster_cpus // actors))
    cpus = min(1.0, (cluster_cpus - 1) / actors) if cluster_cpus >= 2 else 1.0
    return ActorPlan(actors, 0.0, math.floor(cpus * 1000) / 1000, threads)  # rounded down: the core stays free

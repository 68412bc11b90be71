"""earmark's online API as a Ray Serve application.

One deployment, ``EarmarkASR``: each replica holds the model, its one model thread
(:class:`asr.scheduler.StreamScheduler`) and the FastAPI routes (:mod:`serve.api`). A realtime
session must live on the replica that holds its caches (a Serve handle call is request/response,
never bidirectional), and uploads are decoded on the same replica in a thread: one hop, no
second copy of the audio. Scaling is by replicas; each one counts its open WebSockets as ongoing
requests, so autoscaling on ``target_ongoing_requests`` scales on open sessions.

Deploy it three ways, with the same fields (:class:`serve.settings.ServeSettings`):

* ``earmark serve --model demo`` (embedded Ray, or ``--address``),
* ``serve run serve.app:build model=demo max_sessions=32``,
* a Serve config (:func:`serve_config`, ``earmark serve --print-config``) in KubeRay's
  ``serveConfigV2`` or ``serve deploy``.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serve.settings import ServeSettings

#: Ongoing requests a replica takes beyond its realtime sessions (uploads, /v1/models).
FILE_REQUESTS = 32
#: A replica being stopped (scale-in, upgrade) waits this long for its open sessions to end.
GRACEFUL_SHUTDOWN_S = 300.0


@serve.deployment(name="EarmarkASR", health_check_period_s=10, health_check_timeout_s=60)
@serve.ingress()
class EarmarkASR:
    def __init__(self, settings: dict[str, Any]) -> None:
        from serve.runtime import Runtime

        self.runtime = Runtime(ServeSettings(**settings))

    def __serve_build_asgi_app__(self) -> Any:
        from serve.api import make_app

        return make_app(self.runtime)

    def check_health(self) -> None:
        if not self.runtime.scheduler.alive:
            raise RuntimeError("the model thread has stopped")

    def __del__(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()


def deployment_options(
    settings: ServeSettings,
    *,
    replicas: int | None = 1,
    autoscale: tuple[int, int] | None = None,
    gpus_per_replica: float = 0.0,
    cpus_per_replica: float = 1.0,
) -> dict[str, Any]:
    """Serve's options for the deployment: the session cap, graceful shutdown, resources, scaling."""
    options: dict[str, Any] = {
        # open WebSockets count as ongoing requests: the cap is sessions plus room for uploads, and
        # earmark itself answers a session over --max-sessions with a typed error (Serve would
        # hold its handshake, or answer 500 past max_queued_requests)
        "max_ongoing_requests": settings.max_sessions + FILE_REQUESTS,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "graceful_shutdown_wait_loop_s": 2.0,
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
    }
    if autoscale is not None:
        low, high = autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            # scale on open sessions: add a replica when they average three quarters of the cap
            "target_ongoing_requests": max(1, int(settings.max_sessions * 0.75)),
            "upscale_delay_s": 10,
            "downscale_delay_s": 600,
        }
    else:
        options["num_replicas"] = replicas or 1
    return options


def build(args: dict[str, Any]) -> Application:
    """The application for ``serve run serve.app:build key=value ...`` and Serve configs: ``args``
    are :class:`ServeSettings` fields (strings from the command line are converted)."""
    settings = ServeSettings(**_typed(dict(args)))
    return EarmarkASR.bind(settings.model_dump(mode="json"))  # type: ignore[attr-defined]


def serve_config(
    settings: ServeSettings, *, host: str = "0.0.0.0", port: int = 8000, app_name: str = "earmark", **options: Any
) -> dict[str, Any]:
    """A Serve config (``serve deploy``, KubeRay's ``serveConfigV2``) for these settings; checked
    by Serve's own ``ServeDeploySchema`` in the tests. ``request_timeout_s`` is left out on
    purpose: it would cut every realtime session at that length."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port, "keep_alive_timeout_s": 90},
        "applications": [
            {
                "name": app_name,
                "route_prefix": "/",
                "import_path": "serve.app:build",
                "args": settings.model_dump(mode="json", exclude_defaults=True),
                "deployments": [{"name": "EarmarkASR", **deployment_options(settings, **options)}],
            }
        ],
    }


def _typed(args: dict[str, Any]) -> dict[str, Any]:
    """``serve run`` passes every value as a string: give each field its type."""
    fields = ServeSettings.model_fields
    out: dict[str, Any] = {}
    for key, value in args.items():
        if isinstance(value, str) and key in fields:
            annotation = str(fields[key].annotation)
            if "bool" in annotation:
                value = value.lower() in ("1", "true", "yes", "on")
            elif "tuple" in annotation:
                value = tuple(v for v in value.split(",") if v)
        out[key] = value
    return out

"""The online API commands of ``earmark``: serve, and api-key."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from jobs.cli.common import AddressOpt, ExitCode, fail

if TYPE_CHECKING:
    from serve.settings import ServeSettings


def serve_command(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="'demo', a .nemo path, an s3:// URI, a hub name, or REGISTRY/NAME (its latest), REGISTRY/NAME@promoted or REGISTRY/NAME@v0003 from a model registry.",
        ),
    ] = "demo",
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; beyond loopback --api-keys is required.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    address: AddressOpt = None,
    replicas: Annotated[int | None, typer.Option("--replicas", min=1, help="Model replicas (default 1).")] = None,
    autoscale: Annotated[
        str | None,
        typer.Option("--autoscale", help="MIN,MAX replicas, scaled on open sessions (instead of --replicas)."),
    ] = None,
    gpus_per_replica: Annotated[float, typer.Option("--gpus-per-replica", min=0, help="0 runs on CPU.")] = 0.0,
    max_sessions: Annotated[int, typer.Option("--max-sessions", min=1, help="Realtime sessions per replica.")] = 64,
    api_keys: Annotated[
        Path | None, typer.Option("--api-keys", help="File of key hashes (make one with `earmark api-key FILE`).")
    ] = None,
    replica_api_keys: Annotated[
        str | None,
        typer.Option(
            "--replica-api-keys",
            help="A key file each replica reads when it starts (a mounted Kubernetes Secret), for configs made "
            "with --print-config; its keys are accepted besides --api-keys.",
        ),
    ] = None,
    idle_timeout: Annotated[float, typer.Option("--idle-timeout", help="Seconds a silent session stays open.")] = 60.0,
    max_session: Annotated[float, typer.Option("--max-session", help="Longest realtime session, seconds.")] = 4
    * 3600.0,
    max_buffer: Annotated[
        float, typer.Option("--max-buffer", help="Seconds of undecoded audio a session may queue.")
    ] = 20.0,
    max_file_mb: Annotated[float, typer.Option("--max-file-mb", help="Largest upload (413 above).")] = 100.0,
    no_batching: Annotated[
        bool, typer.Option("--no-batching", help="One model call per file part and per session (for comparisons).")
    ] = False,
    print_config: Annotated[
        bool,
        typer.Option("--print-config", help="Print the Serve config (serve deploy / KubeRay serveConfigV2) and exit."),
    ] = False,
) -> None:
    """Serve the model online: OpenAI-compatible /v1/audio/transcriptions, realtime WebSocket
    streaming at /v1/realtime, and a try-it page at /. Runs until interrupted (Ctrl-C)."""
    from serve.auth import KeyFileError, read_key_file
    from serve.settings import ServeSettings

    if replicas is not None and autoscale is not None:
        fail("give --replicas or --autoscale, not both", ExitCode.USAGE)
    scale = _parse_autoscale(autoscale) if autoscale else None
    hashes: tuple[str, ...] = ()
    if api_keys is not None:
        try:
            hashes = read_key_file(api_keys)
        except KeyFileError as exc:
            fail(str(exc))
    if not hashes and not replica_api_keys and not _is_loopback(host):
        fail(
            f"--host {host} listens beyond this machine, so API keys are required: make a key file with "
            "`earmark api-key keys.txt` and pass --api-keys keys.txt or --replica-api-keys PATH (or listen on "
            "127.0.0.1)",
            ExitCode.USAGE,
        )
    settings = ServeSettings(
        model=_resolve_model(model),
        device=None if gpus_per_replica > 0 else "cpu",
        api_key_hashes=hashes,
        api_keys_file=replica_api_keys,
        max_sessions=max_sessions,
        idle_timeout_s=idle_timeout,
        max_session_s=max_session,
        max_buffer_s=max_buffer,
        max_file_mb=max_file_mb,
        batching=not no_batching,
    )
    options: dict[str, Any] = {"replicas": replicas, "autoscale": scale, "gpus_per_replica": gpus_per_replica}
    if print_config:
        from serve.app import serve_config

        typer.echo(json.dumps(serve_config(settings, host=host, port=port, **options), indent=2))
        return
    _check_port_free(host, port)
    _run(settings, host=host, port=port, address=address, **options)


def _run(settings: ServeSettings, *, host: str, port: int, address: str | None, **options: Any) -> None:
    import signal
    import threading

    from cluster.runtime import connect, disconnect
    from serve.proxy import PROXY_CALLBACK

    # Serve's proxy strips a client's x-request-timeout-seconds through this callback; the
    # processes of embedded Ray inherit it (a cluster's head sets it itself: infra/)
    os.environ.setdefault(*PROXY_CALLBACK)
    try:
        connect(address)
        from ray import serve

        # Serve sets its driver-side logger to INFO when imported: earmark's own line says it started
        logging.getLogger("ray.serve").setLevel(
            logging.INFO if logging.getLogger().level <= logging.INFO else logging.WARNING
        )

        from serve.app import EarmarkASR, deployment_options

        serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": 90})
        app = EarmarkASR.options(**deployment_options(settings, **options)).bind(settings.model_dump(mode="json"))  # type: ignore[attr-defined]
        try:
            serve.run(app, name="earmark", route_prefix="/", blocking=False)
        except RuntimeError as exc:
            fail(f"the server did not start: {str(exc).splitlines()[0]} (--verbose shows the replica's log)")
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        typer.echo(
            f"earmark serving {settings.model} at http://{shown}:{port}/ (OpenAI base URL http://{shown}:{port}/v1); "
            "Ctrl-C stops it",
            err=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()
    finally:
        disconnect()


def _resolve_model(spec: str) -> str:
    """``REGISTRY/NAME[@promoted|@vN]`` -> the registry's .nemo URI; anything else stays as it is
    (a path, ``demo``, ``s3://`` or a hub name is the engine's to load)."""
    from cluster.storage import StorageOptions
    from jobs.registry import Registry, RegistryError

    base, at, version = spec.rpartition("@")
    if not at:
        base, version = spec, ""
    registry, _, name = base.rstrip("/").rpartition("/")
    is_registry = bool(at) or (registry and not spec.endswith(".nemo") and Path(registry).is_dir())
    if not is_registry or not registry:
        return spec
    if version not in ("", "promoted") and not (version.startswith("v") and version[1:].isdigit()):
        fail(f"--model {spec}: after '@' write 'promoted' or a version such as v0003", ExitCode.USAGE)
    reg = Registry(registry, StorageOptions.from_env())
    try:
        if version == "promoted":
            promoted = reg.promoted(name)
            if promoted is None:
                fail(f"--model {spec}: {name} has no promoted version in {registry} (`earmark models list` shows them)")
            version = promoted
        return reg.model_uri(f"{name}/{version}" if version else name)
    except RegistryError as exc:
        fail(str(exc))


def _parse_autoscale(value: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r}: write it as MIN,MAX, e.g. 1,4") from None
    if not 0 <= low <= high or high < 1:
        raise typer.BadParameter(f"{value!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            fail(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port", ExitCode.USAGE)


def api_key(
    file: Annotated[Path, typer.Argument(help="Key file to append the new key's hash to (created if missing).")],
    name: Annotated[
        str | None, typer.Option("--name", help="A note kept beside the hash (who the key is for).")
    ] = None,
) -> None:
    """Make an API key for `earmark serve --api-keys FILE`: prints the key once, stores only its hash."""
    from serve.auth import append_key

    typer.echo(append_key(file, name))
    typer.echo(f"the key's sha256 is in {file}; the key itself is shown only now", err=True)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("api-key")(api_key)

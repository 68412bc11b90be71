"""What every command group of ``earmark`` shares: the options, one way to fail, a Ray session
for jobs, and loading a model or audio with a clear error. Nothing heavy is imported here."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Protocol, TypeVar

import typer

if TYPE_CHECKING:
    import numpy as np

    from asr.engine import Transcriber

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="'demo' (bundled), a .nemo path, an s3:// URI or a hub name (nvidia/...)."),
]
LangOpt = Annotated[str, typer.Option("--lang", "-l", help="'auto' (detect per sentence) or a locale such as de-DE.")]
AttOpt = Annotated[
    str | None,
    typer.Option("--att-context", help="Latency mode as LEFT,RIGHT, e.g. 56,13 (1120 ms chunks) ... 56,0 (80 ms)."),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda when available).")]
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else Ray starts embedded)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; print only the result JSON.")]


def fail(message: str) -> NoReturn:
    """Print ``error: message`` to stderr and exit with status 2 (what was wrong, and what to do)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def parse_att_context(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        left, right = (int(v) for v in value.replace(" ", "").strip("[]()").split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r}: write it as LEFT,RIGHT, e.g. 56,13") from None
    return left, right


@contextlib.contextmanager
def ray_job(address: str | None) -> Iterator[None]:
    """The Ray session of a job run from the command line: it connects (embedded, or to
    ``address``), and while the job runs whatever prints to stdout (Ray's worker and raylet
    messages, the progress bar) goes to stderr, so stdout holds only the result (the JSON of
    --quiet). Then the command leaves Ray (see :func:`cluster.runtime.disconnect`)."""
    from cluster.runtime import ray_session

    with contextlib.redirect_stdout(sys.stderr), ray_session(address):
        yield


class Result(Protocol):
    """What a job returns: a record with one JSON form."""

    def to_dict(self) -> dict[str, Any]: ...


_R = TypeVar("_R", bound=Result)


def run_job(job: Callable[[], _R], *, address: str | None, errors: tuple[type[Exception], ...], as_json: bool) -> _R:
    """Run ``job`` in a Ray session for the command line (:func:`ray_job`) and return its result,
    having printed it as JSON when ``as_json``; the ``errors`` it raises become one clear message
    and exit status 2."""
    try:
        with ray_job(address):
            result = job()
    except errors as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    return result


def load_engine(model: str, device: str | None) -> Transcriber:
    from asr.engine import Transcriber
    from asr.model import ModelLoadError
    from cluster.storage import StorageError, is_remote, localize

    try:
        spec = localize(model) if is_remote(model) else model
        return Transcriber.load(spec, device=device)
    except (ModelLoadError, StorageError) as exc:
        fail(str(exc))


def read_audio(source: str) -> np.ndarray:
    from pathlib import Path

    from asr.audio import AudioError, decode_audio
    from cluster.storage import StorageError, is_remote, read_bytes

    try:
        data = read_bytes(source) if is_remote(source) else Path(source)
        return decode_audio(data)
    except (AudioError, StorageError) as exc:
        fail(str(exc))

"""What every command group of ``earmark`` shares: the options, one way to fail, a Ray session
for jobs, and loading a model or audio with a clear error. Nothing heavy is imported here."""

from __future__ import annotations

import contextlib
import enum
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


class ExitCode(enum.IntEnum):
    """The exit statuses of ``earmark`` (documented in the README and ``earmark --help``): 0 when
    done, 1 for an unexpected failure (a bug, with its traceback), and these."""

    #: bad usage: an option or argument is wrong (also Typer's own status for usage errors)
    USAGE = 2
    #: an input problem: a missing, unreadable or inconsistent file, manifest, model or database
    INPUT = 3
    #: storage or the cluster could not be reached within the retry budget: rerun to resume
    UNREACHABLE = 4


def fail(message: str, code: ExitCode = ExitCode.INPUT) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code`` (what was wrong, and what to do)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(int(code))


def unreachable(exc: BaseException) -> str | None:
    """The one-line message for a failure of storage or of the cluster behind ``exc`` (anywhere
    in its chain, through Ray's task errors), or None when it is something else."""
    from cluster.runtime import ClusterUnreachableError
    from cluster.storage import StorageError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageError) and e.transient:
            return f"storage unreachable: {e.uri}: {e.problem}"
        if isinstance(e, ClusterUnreachableError):
            return str(e)
        if _database_unreachable(e):
            return f"database unreachable: {str(getattr(e, 'orig', e)).splitlines()[0]}"
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]  # RayTaskError keeps its cause
    return None


def parse_att_context(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        left, right = (int(v) for v in value.replace(" ", "").strip("[]()").split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r}: write it as LEFT,RIGHT, e.g. 56,13") from None
    return left, right


def _database_unreachable(exc: BaseException) -> bool:
    """A connection to the review database that failed or broke (SQLAlchemy says so)."""
    if "sqlalchemy" not in sys.modules:  # never import SQLAlchemy just to ask
        return False
    from labeling.db import connection_failed

    # SQLite is a file, not a server: its errors are input problems
    return connection_failed(exc) and not type(getattr(exc, "orig", None)).__module__.startswith("sqlite3")


@contextlib.contextmanager
def ray_job(address: str | None) -> Iterator[None]:
    """The Ray session of a job run from the command line: it connects (embedded, or to
    ``address``), and while the job runs whatever prints to stdout (Ray's worker and raylet
    messages, the progress bar) goes to stderr, so stdout holds only the result (the JSON of
    --quiet). Then the command leaves Ray (see :func:`cluster.runtime.disconnect`)."""
    from cluster.runtime import filtered_native_stderr, ray_session

    with filtered_native_stderr(), contextlib.redirect_stdout(sys.stderr), ray_session(address):
        yield


class Result(Protocol):
    """What a job returns: a record with one JSON form."""

    def to_dict(self) -> dict[str, Any]: ...


_R = TypeVar("_R", bound=Result)


def run_job(job: Callable[[], _R], *, address: str | None, errors: tuple[type[Exception], ...], as_json: bool) -> _R:
    """Run ``job`` in a Ray session for the command line (:func:`ray_job`) and return its result,
    having printed it as JSON when ``as_json``; the ``errors`` it raises become one clear message
    and exit status 3 (storage or the cluster out of reach: status 4, see :func:`main`)."""
    try:
        with ray_job(address):
            result = job()
    except errors as exc:
        if unreachable(exc) is not None:
            raise
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

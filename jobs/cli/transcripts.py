"""``earmark transcripts``: a batch job's pseudo-labels as one document per recording (SRT, VTT, text, JSON)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from jobs.cli.common import fail

if TYPE_CHECKING:
    from cluster.storage import StorageOptions

log = logging.getLogger(__name__)


def transcripts(
    out: Annotated[
        str, typer.Argument(help="The output folder of earmark transcribe (local or s3://), or one of its parts.")
    ],
    to: Annotated[str, typer.Option("--to", help="Folder (local or s3://) to write one file per recording into.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="srt, vtt, txt (text) or json (OpenAI's verbose_json).")
    ] = "srt",
    endpoint_url: Annotated[
        str | None,
        typer.Option("--endpoint-url", help="S3-compatible endpoint (default: $EARMARK_S3_ENDPOINT_URL, else AWS)."),
    ] = None,
) -> None:
    """Write a transcript file per recording (segments of long recordings joined, times absolute)."""
    import dataclasses

    from cluster import storage
    from jobs.evaluate import read_labels
    from records.transcripts import FORMATS, file_names, recordings_from_labels, render

    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r}: one of {', '.join(FORMATS)}", param_hint="--format")
    options = storage.StorageOptions.from_env()
    if endpoint_url:
        options = dataclasses.replace(options, endpoint_url=endpoint_url)
    with _input_problems(out):
        if not _has_parts(out, options):
            fail(
                f"{out}: no pseudo-labels (part-*.parquet) there; pass the --out folder of an `earmark transcribe` "
                "run (run the job first if there is none)"
            )
        if not out.endswith(".parquet") and not storage.exists(f"{out.rstrip('/')}/_SUCCESS", options):
            log.warning("%s has no _SUCCESS: its job has not finished, so some recordings may be missing", out)
        recordings = recordings_from_labels(read_labels(out, options))
    written = [t for t in recordings if t.parts > 0]
    skipped = [t for t in recordings if t.parts == 0]
    with _input_problems(to):
        for name, t in zip(file_names(written, fmt), written, strict=True):
            storage.write_bytes(f"{to.rstrip('/')}/{name}", render(t, fmt).encode(), options)
    for t in skipped[:5]:
        typer.secho(f"skipped {t.source}: {t.errors[0] if t.errors else 'nothing transcribed'}", err=True)
    partial = sum(1 for t in written if t.errors)
    typer.echo(
        f"wrote {len(written)} .{FORMATS[fmt]} files to {to}; {len(skipped)} recordings skipped (every segment "
        f"failed); {partial} written with failed segments left out"
    )


@contextlib.contextmanager
def _input_problems(uri: str) -> Iterator[None]:
    """A bad folder or table becomes one message and status 3; storage out of reach stays status 4."""
    from cluster.storage import StorageError

    try:
        yield
    except (StorageError, ValueError) as exc:
        if isinstance(exc, StorageError) and exc.transient:
            raise  # see jobs.cli.main
        fail(f"{exc}" if uri in str(exc) else f"{uri}: {exc}")


def _has_parts(out: str, options: StorageOptions) -> bool:
    """Whether ``out`` is a Parquet file, or a folder holding some that Parquet readers read (not
    those below a name starting with ``_`` or ``.``); a missing folder holds none."""
    import os

    from cluster import storage

    if out.endswith(".parquet"):
        return storage.exists(out, options)
    try:
        for uri in storage.list_files(out, options, suffixes=(".parquet",)):
            rel = uri[len(out.rstrip("/")) + 1 :] if storage.is_remote(out) else os.path.relpath(uri, out)
            if not any(part.startswith(("_", ".")) for part in rel.split("/")):
                return True
    except storage.StorageError as exc:
        if exc.transient:
            raise
    return False


def register(app: typer.Typer) -> None:
    app.command()(transcripts)

"""The ``earmark`` command line: one module per command group, shared helpers in
:mod:`jobs.cli.common`. Commands parse arguments and call library functions, nothing more.

Heavy modules (torch, NeMo, Ray) are imported inside commands, so ``earmark --help`` is instant.
:func:`main` is the ``earmark`` executable (also ``python -m jobs`` and ``python -m jobs.cli``).
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from jobs.cli import demo, models, review, serve, transcribe, transcripts
from jobs.cli.common import ExitCode, unreachable

app = typer.Typer(
    name="earmark",
    help="Turn audio archives into labeled speech data and better speech models.",
    epilog=(
        "Exit status: 0 done; 1 unexpected failure (a bug); 2 bad usage; 3 an input problem (missing or bad "
        "file, manifest, model, database); 4 storage or the cluster unreachable after retrying (nothing committed "
        "is lost: rerun the same command to resume)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"earmark {version('earmark')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log what happens (NeMo's logs included); tracebacks on failure.")
    ] = False,
    retry_budget: Annotated[
        float | None,
        typer.Option(
            "--retry-budget",
            min=0,
            help="Seconds to keep retrying unreachable storage before giving up (default 180; $EARMARK_RETRY_BUDGET_S).",
        ),
    ] = None,
) -> None:
    import os

    global _verbose
    _verbose = verbose
    if retry_budget is not None:  # through the environment, so that Ray workers get it too
        from cluster.retry import BUDGET_ENV

        os.environ[BUDGET_ENV] = f"{retry_budget:g}"

    # stdout carries results (--json); every library log goes to stderr
    os.environ.setdefault("NEMO_REDIRECT_LOGS_TO_STDERR", "1")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")
        for name in ("nemo_logger", "nemo", "lightning", "pytorch_lightning", "numba", "nv_one_logger"):
            logging.getLogger(name).setLevel(logging.ERROR)


transcribe.register(app)
demo.register(app)
review.register(app)
models.register(app)
serve.register(app)
transcripts.register(app)


_verbose = False


def main() -> None:
    """The ``earmark`` executable: the CLI in a process with earmark's allocator settings (see
    :data:`cluster.runtime.ALLOCATOR_ENV`); nothing heavy is imported before the restart that
    applies them, and ``--help`` never restarts. Storage or a cluster out of reach ends it with
    one line and status 4 (the traceback with ``--verbose``)."""
    from cluster.runtime import restart_with_allocator_env

    if len(sys.argv) > 1 and not {"--help", "-h", "--version"} & set(sys.argv):
        restart_with_allocator_env()
    try:
        sys.exit(app())
    except Exception as exc:
        message = unreachable(exc)
        if message is None or _verbose:
            raise
        typer.secho(
            f"error: {message}. Nothing committed is lost: rerun the same command to resume "
            "(--retry-budget SECONDS to wait longer, --verbose for the traceback).",
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(int(ExitCode.UNREACHABLE))

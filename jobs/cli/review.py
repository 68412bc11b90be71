"""The review-queue commands of ``earmark``: route, queue, export, calibrate, reviewers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from jobs.cli.common import ExitCode, ModelOpt, fail

if TYPE_CHECKING:
    from labeling.queue import ReviewQueue

DbOpt = Annotated[
    str, typer.Option("--db", help="sqlite:///review.db (default) or postgresql://user@host/db.", envvar="EARMARK_DB")
]
ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Project name (one per corpus or run set).")]

queue_app = typer.Typer(help="Look at the review queue.", no_args_is_help=True)
reviewers_app = typer.Typer(help="Add, list and revoke reviewers.", no_args_is_help=True)


def open_queue(db: str, *, migrate: bool = True) -> ReviewQueue:
    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    from labeling.queue import QueueError, ReviewQueue

    try:
        return ReviewQueue.connect(db, migrate=migrate)
    except QueueError as exc:
        fail(str(exc))
    except OperationalError as exc:
        if db.startswith("sqlite"):
            fail(f"cannot open the review database {db}: {str(exc.orig).splitlines()[0]}; check the path")
        # a server that did not answer (or refused the login)
        fail(f"cannot reach the review database {db}: {str(exc.orig).splitlines()[0]}", ExitCode.UNREACHABLE)
    except SQLAlchemyError as exc:
        fail(f"cannot open the review database {db}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")


def route(
    pseudo_labels: Annotated[
        str, typer.Argument(help="The Parquet output of earmark transcribe (folder, file or s3://).")
    ],
    project: ProjectOpt,
    db: DbOpt = "sqlite:///review.db",
    policy: Annotated[Path | None, typer.Option("--policy", help="A YAML file of routing thresholds.")] = None,
) -> None:
    """Decide accept / review / reject for every clip and queue the reviews (idempotent)."""
    import yaml

    from cluster.storage import StorageOptions
    from labeling.ingest import route_table
    from labeling.policy import Policy

    try:
        rules = Policy.from_dict(yaml.safe_load(policy.read_text()) or {}) if policy else Policy()
    except (OSError, ValueError, TypeError, yaml.YAMLError) as exc:
        fail(f"{policy}: {exc}")
    queue = open_queue(db)
    try:
        report = route_table(queue, project, pseudo_labels, rules, options=StorageOptions.from_env())
    except (OSError, ValueError) as exc:
        fail(f"{pseudo_labels}: {exc}")
    typer.echo(json.dumps(report.to_dict(), indent=2))


@queue_app.command("stats")
def queue_stats(project: ProjectOpt, db: DbOpt = "sqlite:///review.db") -> None:
    """Clips per decision and tasks per language and state."""
    from labeling.queue import QueueError

    try:
        typer.echo(json.dumps(open_queue(db).stats(project), indent=2))
    except QueueError as exc:
        fail(str(exc))


@queue_app.command("migrate")
def queue_migrate(db: DbOpt = "sqlite:///review.db") -> None:
    """Create or upgrade the review database's schema (Alembic), then exit; safe to run from
    several processes at once. Run it before `earmark review --no-migrate` (a Deployment's init
    container)."""
    from labeling.db import schema_revisions

    queue = open_queue(db)
    current, _ = schema_revisions(queue.engine)
    typer.echo(f"review database at schema revision {current}")


def export(
    project: ProjectOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for train.jsonl, dev.jsonl and export.json.")],
    db: DbOpt = "sqlite:///review.db",
    min_confidence: Annotated[
        float | None, typer.Option("--min-confidence", help="Leave out accepted pseudo-labels under this confidence.")
    ] = None,
    dev_fraction: Annotated[float, typer.Option("--dev-fraction", help="Share of reviewed clips in dev.")] = 0.2,
    reviewed_only: Annotated[bool, typer.Option("--reviewed-only", help="Export corrections only.")] = False,
) -> None:
    """Write NeMo manifests of corrections and trusted pseudo-labels (deterministic train/dev split)."""
    from labeling.export import ExportOptions, export_manifests
    from labeling.queue import QueueError

    options = ExportOptions(dev_fraction=dev_fraction, min_confidence=min_confidence, include_pseudo=not reviewed_only)
    try:
        typer.echo(json.dumps(export_manifests(open_queue(db), project, out, options).to_dict(), indent=2))
    except QueueError as exc:
        fail(str(exc))


def calibrate(
    project: ProjectOpt,
    db: DbOpt = "sqlite:///review.db",
    target_wer: Annotated[float, typer.Option("--target-wer", help="WER the accepted pseudo-labels may have.")] = 0.05,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the result as JSON here.")] = None,
) -> None:
    """Per language: WER of pseudo-labels against corrections by confidence, and a suggested threshold."""
    from rich.console import Console
    from rich.table import Table

    from labeling.calibrate import calibrate as run
    from labeling.queue import QueueError

    try:
        result = run(open_queue(db), project, target_wer=target_wer)
    except QueueError as exc:
        fail(str(exc))
    table = Table(title=f"confidence calibration for {project} (target WER {target_wer:.0%})")
    for col in ("language", "reviewed", "pseudo-label WER", "suggested threshold", "WER by confidence"):
        table.add_column(col)
    for lang, cal in result.languages.items():
        bins = "  ".join(f"{b.confidence}: {b.wer:.0%}" for b in cal.bins if b.wer is not None)
        threshold = "-" if cal.suggested_threshold is None else f"{cal.suggested_threshold:.2f}"
        table.add_row(lang, str(cal.reviewed_clips), f"{cal.pseudo_label_wer:.1%}", threshold, bins)
    Console().print(table)
    if out:
        out.write_text(json.dumps(result.to_dict(), indent=2))


@reviewers_app.command("add")
def reviewers_add(
    name: str,
    db: DbOpt = "sqlite:///review.db",
    admin: Annotated[bool, typer.Option("--admin", help="Can reopen and reassign tasks.")] = False,
) -> None:
    """Create a reviewer and print their token (shown once; only its hash is stored)."""
    from labeling.queue import QueueError

    try:
        reviewer, token = open_queue(db).add_reviewer(name, role="admin" if admin else "reviewer")
    except QueueError as exc:
        fail(str(exc))
    typer.echo(f"reviewer {reviewer.name} ({reviewer.role}) token: {token}")
    typer.echo("Keep the token now: it cannot be shown again.", err=True)


@reviewers_app.command("list")
def reviewers_list(db: DbOpt = "sqlite:///review.db") -> None:
    for r in open_queue(db).reviewers():
        state = "active" if r.active else f"revoked {r.revoked_at:%Y-%m-%d}"
        typer.echo(f"{r.id}\t{r.name}\t{r.role}\t{state}")


@reviewers_app.command("revoke")
def reviewers_revoke(name: str, db: DbOpt = "sqlite:///review.db") -> None:
    """Revoke a reviewer's token; their claimed tasks go back to the queue."""
    from labeling.queue import QueueError

    try:
        open_queue(db).revoke_reviewer(name)
    except QueueError as exc:
        fail(str(exc))
    typer.echo(f"revoked {name}")


def review(
    project: ProjectOpt,
    db: DbOpt = "sqlite:///review.db",
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8600,
    model: ModelOpt = "demo",
    audio_root: Annotated[
        Path | None, typer.Option("--audio-root", help="Serve local audio only from under this folder.")
    ] = None,
    session_hours: Annotated[float, typer.Option("--session-hours", help="How long a sign-in lasts.")] = 12.0,
    session_secret: Annotated[
        str | None,
        typer.Option(
            "--session-secret",
            envvar="EARMARK_SESSION_SECRET",
            show_default=False,
            help="Key that signs sign-in cookies (32+ characters): every replica of the app needs the same one, "
            "and sign-ins survive restarts. Unset: a random key per process.",
        ),
    ] = None,
    locales: Annotated[
        str | None,
        typer.Option("--locales", help="Comma-separated locales for the language selector (default: the model's)."),
    ] = None,
    secure_cookies: Annotated[
        bool, typer.Option("--secure-cookies", help="Send cookies over HTTPS only (behind a TLS proxy).")
    ] = False,
    migrate: Annotated[
        bool,
        typer.Option(
            "--migrate/--no-migrate",
            help="Upgrade the database schema at start; --no-migrate refuses an old schema "
            "(run `earmark queue migrate` apart).",
        ),
    ] = True,
) -> None:
    """Serve the review web app (sign in with a token from `earmark reviewers add`)."""
    import secrets

    import uvicorn

    from asr.model import ModelLoadError, read_locales
    from labeling.webapp import Settings, create_app

    if session_secret is not None and len(session_secret) < 32:
        fail("--session-secret ($EARMARK_SESSION_SECRET) is too short: use 32 characters or more", ExitCode.USAGE)
    if locales:
        choices = sorted({c.strip() for c in locales.split(",") if c.strip()})
    else:
        try:
            choices = read_locales(model)
        except ModelLoadError as exc:
            fail(f"{exc} (or give the languages with --locales)")
    queue = open_queue(db, migrate=migrate)
    if project not in queue.projects():
        fail(f"no project named {project!r} in {db}; route pseudo-labels into it first (earmark route)")
    if session_secret is None:
        typer.echo(
            "earmark review: no --session-secret ($EARMARK_SESSION_SECRET): sign-ins end when this process stops "
            "and are not shared with other replicas",
            err=True,
        )
    settings = Settings(
        db=db, project=project, locales=choices, session_hours=session_hours,
        audio_root=str(audio_root.resolve()) if audio_root else None, secure_cookies=secure_cookies,
        secret=session_secret.encode() if session_secret else secrets.token_bytes(32),
    )  # fmt: skip
    typer.echo(f"earmark review: http://{host}:{port}/  (project {project}, {db})")
    uvicorn.run(create_app(settings, queue), host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command()(review)
    app.command()(route)
    app.command()(export)
    app.command()(calibrate)
    app.add_typer(queue_app, name="queue")
    app.add_typer(reviewers_app, name="reviewers")

"""The transcription commands of ``earmark``: transcribe-file, transcribe, evaluate."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from jobs.cli.common import (
    AddressOpt,
    AttOpt,
    DeviceOpt,
    ExitCode,
    LangOpt,
    ModelOpt,
    QuietOpt,
    fail,
    load_engine,
    parse_att_context,
    read_audio,
    run_job,
)

if TYPE_CHECKING:
    from asr.results import Transcript
    from jobs.transcribe import TranscribeSummary


def transcribe_file(
    path: Annotated[str, typer.Argument(help="An audio file: a local path or s3://bucket/key.")],
    lang: LangOpt = "auto",
    att_context: AttOpt = None,
    model: ModelOpt = "demo",
    device: DeviceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole transcript as JSON.")] = False,
) -> None:
    """Transcribe one file and print its text sentence by sentence, with language and confidence."""
    from asr.engine import TranscribeOptions

    att = parse_att_context(att_context)
    audio = read_audio(path)
    engine = load_engine(model, device)
    try:
        (result,) = engine.transcribe([audio], options=TranscribeOptions(lang=lang, att_context=att))
    except ValueError as exc:  # a language or latency mode the model does not have
        fail(str(exc), ExitCode.USAGE)
    if as_json:
        typer.echo(json.dumps({"source": path, **result.to_dict()}, ensure_ascii=False, indent=2))
        return
    print_transcript(path, result)


def print_transcript(name: str, result: Transcript) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"{name}  ({result.duration_s:.1f} s, {result.model_id}, att {result.att_context[0]},{result.att_context[1]})"
    )
    for col in ("start", "end", "lang", "conf", "text"):
        table.add_column(col, justify="right" if col in ("start", "end", "conf") else "left")
    for s in result.sentences:
        table.add_row(f"{s.start_s:.2f}", f"{s.end_s:.2f}", s.lang or "-", f"{s.confidence:.2f}", s.text)
    if not result.sentences:
        table.add_row("-", "-", "-", f"{result.confidence:.2f}", "[dim](no speech recognised)[/dim]")
    console.print(table)
    console.print(
        f"language: {result.lang_detected or 'unknown'} (requested {result.lang_requested}), confidence {result.confidence:.2f}"
    )


def transcribe(
    input: Annotated[
        str,
        typer.Argument(
            help="A folder, a glob ('talks/**/*.wav'), a NeMo manifest (.json/.jsonl) or s3://bucket/prefix."
        ),
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="Output folder (local or s3://) for the Parquet pseudo-labels.")
    ],
    lang: LangOpt = "auto",
    att_context: AttOpt = None,
    model: ModelOpt = "demo",
    device: DeviceOpt = None,
    address: AddressOpt = None,
    actors: Annotated[
        int | None, typer.Option("--actors", help="Model actors (default: one per GPU, or 1 on CPU).")
    ] = None,
    gpus_per_actor: Annotated[
        float | None,
        typer.Option("--gpus-per-actor", help="GPUs per actor (default 1 when the cluster has GPUs, else 0)."),
    ] = None,
    batch_seconds: Annotated[
        float | None,
        typer.Option("--batch-seconds", help="Padded audio seconds per forward pass (default: 60 on CPU, 600 on GPU)."),
    ] = None,
    endpoint_url: Annotated[
        str | None,
        typer.Option("--endpoint-url", help="S3-compatible endpoint (default: $EARMARK_S3_ENDPOINT_URL, else AWS)."),
    ] = None,
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Input clips per shard, the unit of commit and resume.", min=1)
    ] = 256,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", help="Clips handed to a model actor per call (packed by duration inside).", min=1),
    ] = 64,
    quiet: QuietOpt = False,
) -> None:
    """Transcribe an archive into Parquet pseudo-labels; rerun the same command to resume."""
    import dataclasses

    from asr.engine import TranscribeOptions
    from cluster.storage import StorageOptions
    from jobs.stages import JobSettings
    from jobs.transcribe import JobError, TranscribeRequest, run_transcribe

    storage_options = StorageOptions.from_env()
    if endpoint_url:
        storage_options = dataclasses.replace(storage_options, endpoint_url=endpoint_url)
    options = TranscribeOptions(lang=lang, att_context=parse_att_context(att_context), batch_seconds=batch_seconds)
    settings = JobSettings(run_id="", model=model, options=options, device=device, storage=storage_options)
    request = TranscribeRequest(
        input=input, out=out, settings=settings, actors=actors, gpus_per_actor=gpus_per_actor,
        lines_per_shard=shard_size, batch_rows=batch_size, quiet=quiet,
    )  # fmt: skip
    summary = run_job(lambda: run_transcribe(request), address=address, errors=(JobError, ValueError), as_json=quiet)
    if not quiet:
        print_summary(summary)


def print_summary(summary: TranscribeSummary) -> None:
    from rich.console import Console

    console = Console()
    run = summary.this_run
    console.print(
        f"[bold]{summary.out}[/bold]: {summary.rows} clips ({summary.clips_ok} ok, {summary.clips_error} errors), "
        f"{summary.audio_hours:.3f} h of audio; this run transcribed {run.rows_transcribed} clips "
        f"in {run.wall_s:.1f} s (RTFx {run.rtfx:.0f})"
    )
    if summary.per_language:
        console.print("languages: " + ", ".join(f"{k} {v}" for k, v in summary.per_language.items()))
    if summary.confidence_quantiles:
        console.print("confidence: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.confidence_quantiles.items()))
    for reason in summary.error_examples:
        console.print(f"[yellow]error:[/yellow] {reason}")


def evaluate(
    manifest: Annotated[str, typer.Option("--manifest", help="NeMo manifest with reference text (tags allowed).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for metrics.json, report.html and the labels.")],
    model: ModelOpt = "demo",
    att_context: AttOpt = None,
    device: DeviceOpt = None,
    address: AddressOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the metrics JSON.")] = False,
) -> None:
    """WER/CER per language (raw and normalized), sentence-language accuracy, confidence AUROC; JSON + HTML."""
    from asr.engine import TranscribeOptions
    from cluster.storage import StorageOptions
    from jobs.evaluate import pct, run_evaluate
    from jobs.stages import JobSettings
    from jobs.transcribe import JobError

    options = TranscribeOptions(att_context=parse_att_context(att_context))
    settings = JobSettings(run_id="", model=model, options=options, device=device, storage=StorageOptions.from_env())
    metrics = run_job(
        lambda: run_evaluate(manifest=manifest, out=out, settings=settings, quiet=quiet),
        address=address,
        errors=(JobError, ValueError, OSError),
        as_json=quiet,
    )
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metrics.model_id} on {manifest}")
    for col in ("language", "clips", "WER", "WER raw", "CER", "sentence-language acc."):
        table.add_column(col)
    for lang, m in metrics.languages.items():
        table.add_row(lang, str(m.clips), pct(m.wer), pct(m.wer_raw), pct(m.cer), pct(m.sentence_language_accuracy))
    Console().print(table)
    auroc = metrics.confidence.auroc_error
    typer.echo(
        f"confidence AUROC (clip has an error): {'-' if auroc is None else f'{auroc:.3f}'}; report: {out}/report.html"
    )


def register(app: typer.Typer) -> None:
    app.command("transcribe-file")(transcribe_file)
    app.command()(transcribe)
    app.command()(evaluate)

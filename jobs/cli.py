"""The ``earmark`` command line. It parses arguments and calls library functions, nothing more.

Heavy modules (torch, NeMo, Ray) are imported inside commands, so ``earmark --help`` is instant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="earmark",
    help="Turn audio archives into labeled speech data and better speech models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"earmark {version('earmark')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens (NeMo's logs included).")] = False,
) -> None:
    import os

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


def parse_att_context(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        left, right = (int(v) for v in value.replace(" ", "").strip("[]()").split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r}: write it as LEFT,RIGHT, e.g. 56,13") from None
    return left, right


@contextlib.contextmanager
def results_stay_on_stdout() -> Iterator[None]:
    """While a job runs, whatever prints to stdout (Ray's worker and raylet messages, the progress
    bar) goes to stderr, so stdout holds only the result (the JSON of --quiet). Then the command
    leaves Ray (see :func:`cluster.runtime.disconnect`)."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        from cluster.runtime import disconnect

        disconnect()


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def load_engine(model: str, device: str | None):  # -> asr.Transcriber
    from asr.engine import Transcriber
    from asr.model import ModelLoadError
    from cluster.storage import StorageError, is_remote, localize

    try:
        spec = localize(model) if is_remote(model) else model
        return Transcriber.load(spec, device=device)
    except (ModelLoadError, StorageError) as exc:
        fail(str(exc))


def read_audio(source: str):  # -> np.ndarray
    from asr.audio import AudioError, decode_audio
    from cluster.storage import StorageError, is_remote, read_bytes

    try:
        data = read_bytes(source) if is_remote(source) else Path(source)
        return decode_audio(data)
    except (AudioError, StorageError) as exc:
        fail(str(exc))


@app.command("transcribe-file")
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
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"source": path, **result.to_dict()}, ensure_ascii=False, indent=2))
        return
    print_transcript(path, result)


def print_transcript(name: str, result) -> None:  # result: asr.Transcript
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


@app.command()
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
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else Ray starts embedded)."),
    ] = None,
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; print only the summary JSON.")] = False,
) -> None:
    """Transcribe an archive into Parquet pseudo-labels; rerun the same command to resume."""
    import dataclasses

    from cluster.storage import StorageOptions
    from jobs.stages import JobSettings
    from jobs.transcribe import JobError, TranscribeRequest, run_transcribe

    storage_options = StorageOptions.from_env()
    if endpoint_url:
        storage_options = dataclasses.replace(storage_options, endpoint_url=endpoint_url)
    settings = JobSettings(
        run_id="",
        lang=lang,
        model=model,
        att_context=parse_att_context(att_context),
        batch_seconds=batch_seconds,
        device=device,
        storage=storage_options,
    )
    request = TranscribeRequest(
        input=input,
        out=out,
        settings=settings,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        address=address,
        lines_per_shard=shard_size,
        batch_rows=batch_size,
        quiet=quiet,
    )
    try:
        with results_stay_on_stdout():
            summary = run_transcribe(request)
    except (JobError, ValueError) as exc:
        fail(str(exc))
    if quiet:
        typer.echo(json.dumps(summary, indent=2))
        return
    print_summary(summary)


def print_summary(summary: dict) -> None:
    from rich.console import Console

    console = Console()
    run = summary["this_run"]
    console.print(
        f"[bold]{summary['out']}[/bold]: {summary['rows']} clips ({summary['clips_ok']} ok, {summary['clips_error']} errors), "
        f"{summary['audio_hours']:.3f} h of audio; this run transcribed {run['rows_transcribed']} clips "
        f"in {run['wall_s']:.1f} s (RTFx {run['rtfx']:.0f})"
    )
    if summary["per_language"]:
        console.print("languages: " + ", ".join(f"{k} {v}" for k, v in summary["per_language"].items()))
    if summary["confidence_quantiles"]:
        console.print("confidence: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["confidence_quantiles"].items()))
    for reason in summary["error_examples"]:
        console.print(f"[yellow]error:[/yellow] {reason}")


@app.command()
def evaluate(
    manifest: Annotated[str, typer.Option("--manifest", help="NeMo manifest with reference text (tags allowed).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for metrics.json, report.html and the labels.")],
    model: ModelOpt = "demo",
    att_context: AttOpt = None,
    device: DeviceOpt = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the metrics JSON.")] = False,
) -> None:
    """WER/CER per language (raw and normalized), sentence-language accuracy, confidence AUROC; JSON + HTML."""
    from cluster.storage import StorageOptions
    from jobs.evaluate import run_evaluate
    from jobs.stages import JobSettings
    from jobs.transcribe import JobError

    settings = JobSettings(
        run_id="",
        model=model,
        device=device,
        att_context=parse_att_context(att_context),
        storage=StorageOptions.from_env(),
    )
    try:
        with results_stay_on_stdout():
            metrics = run_evaluate(manifest=manifest, out=out, settings=settings, address=address, quiet=quiet)
    except (JobError, ValueError, OSError) as exc:
        fail(str(exc))
    if quiet:
        typer.echo(json.dumps(metrics, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metrics['model_id']} on {manifest}")
    for col in ("language", "clips", "WER", "WER raw", "CER", "sentence-language acc."):
        table.add_column(col)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    for lang, m in metrics["languages"].items():
        table.add_row(
            lang, str(m["clips"]), pct(m["wer"]), pct(m["wer_raw"]), pct(m["cer"]), pct(m["sentence_language_accuracy"])
        )
    Console().print(table)
    auroc = metrics["confidence"]["auroc_error"]
    typer.echo(
        f"confidence AUROC (clip has an error): {'-' if auroc is None else f'{auroc:.3f}'}; report: {out}/report.html"
    )


demo_app = typer.Typer(help="The bundled demos: the main job on the sample corpus, and the closed loop.")
app.add_typer(demo_app, name="demo")


@demo_app.callback(invoke_without_command=True)
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo's pseudo-labels go.")] = Path(
        "build/demo/labels"
    ),
    model: ModelOpt = "demo",
    device: DeviceOpt = None,
    att_context: AttOpt = None,
) -> None:
    """Run the main job (earmark transcribe) on the bundled sample corpus and score it;
    `earmark demo loop` runs the closed loop on a new accent."""
    if ctx.invoked_subcommand is not None:
        return
    from cluster.storage import StorageOptions
    from jobs.demo import run_demo
    from jobs.stages import JobSettings
    from jobs.transcribe import JobError, TranscribeRequest, run_transcribe

    settings = JobSettings(
        run_id="", model=model, device=device, att_context=parse_att_context(att_context), storage=StorageOptions()
    )

    def run_job(manifest: Path, out: Path) -> dict:
        try:
            return run_transcribe(
                TranscribeRequest(input=str(manifest), out=str(out), settings=settings, lines_per_shard=32)
            )
        except (JobError, ValueError) as exc:
            fail(str(exc))
            raise

    run_demo(out=out.resolve(), run_job=run_job)


@demo_app.command("loop")
def demo_loop(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for data, labels, queue, registry, report.")] = Path(
        "build/loop"
    ),
    steps: Annotated[int, typer.Option("--max-steps", help="Fine-tuning steps.")] = 150,
    workers: Annotated[int, typer.Option("--workers", help="Ray Train workers.")] = 2,
    voice: Annotated[
        str | None, typer.Option("--voice", help="espeak-ng voice of the accent set, e.g. en-gb-x-rp (British).")
    ] = None,
    variants: Annotated[
        str | None, typer.Option("--variants", help="espeak-ng voice variants of the accent set, e.g. m6,m8,f5.")
    ] = None,
    speed: Annotated[
        str | None,
        typer.Option("--speed", help="Words per minute of the accent set, MIN,MAX (the demo learned 135,190)."),
    ] = None,
) -> None:
    """The closed loop on a new accent: transcribe, route, review (simulated), export, fine-tune,
    evaluate, promote; prints before/after WER and writes loop-report.json/.html."""
    from dataclasses import replace

    from jobs.finetune import FinetuneError
    from jobs.loop import LoopSettings, accent_name, run_loop

    settings = LoopSettings(workers=workers)
    settings.train = replace(settings.train, max_steps=steps)
    if voice:
        settings.voice = voice
    if variants:
        settings.variants = tuple(v.strip() for v in variants.split(",") if v.strip())
    if speed:
        try:
            low, high = (int(v) for v in speed.split(","))
        except ValueError:
            raise typer.BadParameter(f"{speed!r}: write it as MIN,MAX words per minute, e.g. 135,190") from None
        if not 0 < low <= high:
            raise typer.BadParameter(f"{speed!r}: MIN must be positive and at most MAX, e.g. 135,190")
        settings.speed = (low, high)
    try:
        with results_stay_on_stdout():
            report = run_loop(out.resolve(), settings, say=lambda m: typer.echo(m, err=True))
    except (FinetuneError, ValueError, OSError) as exc:
        fail(str(exc))
    acc = report["accent"]
    typer.echo(
        f"accent ({accent_name(acc)}): WER {100 * acc['wer_before']:.1f} % -> {100 * acc['wer_after']:.1f} % "
        f"({100 * acc['relative_reduction']:.0f} % lower), {100 * report['review']['share']:.0f} % of clips reviewed"
    )
    for lang, v in report["original"].items():
        after = "-" if v["after"] is None else f"{100 * v['after']:.1f} %"
        typer.echo(f"original {lang}: WER {100 * v['before']:.1f} % -> {after}")
    promotion = report["model"]["promotion"]
    typer.echo(
        f"model {report['model']['version']}: " + ("promoted" if "refused" not in promotion else promotion["refused"])
    )
    typer.echo(f"report: {out / 'loop-report.html'}")


from jobs.review_cli import register as _register_review_commands  # noqa: E402 - after the app exists

_register_review_commands(app)

from jobs.model_cli import register as _register_model_commands  # noqa: E402

_register_model_commands(app)

if __name__ == "__main__":  # pragma: no cover - `python -m jobs.cli` is the `earmark` executable too
    from jobs.__main__ import main

    main()

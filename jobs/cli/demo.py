"""The demo commands of ``earmark``: the main job on the bundled corpus, and the closed loop."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.cli.common import AttOpt, DeviceOpt, ModelOpt, fail, parse_att_context, run_job

demo_app = typer.Typer(help="The bundled demos: the main job on the sample corpus, and the closed loop.")


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
    from asr.engine import TranscribeOptions
    from cluster.runtime import filtered_native_stderr, ray_session
    from cluster.storage import StorageOptions
    from jobs.demo import run_demo
    from jobs.stages import JobSettings
    from jobs.transcribe import JobError

    options = TranscribeOptions(att_context=parse_att_context(att_context))
    settings = JobSettings(run_id="", model=model, options=options, device=device, storage=StorageOptions())
    try:
        # the demo's tables are its result: they stay on stdout
        with filtered_native_stderr(), ray_session(None):
            run_demo(out=out.resolve(), settings=settings)
    except (JobError, ValueError) as exc:
        fail(str(exc))


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

    from jobs.evaluate import pct
    from jobs.finetune import FinetuneError
    from jobs.loop import LoopSettings, accent_name, run_loop
    from records.manifest import ManifestError

    settings = LoopSettings(workers=workers)
    settings = replace(settings, train=replace(settings.train, max_steps=steps))
    if voice:
        settings = replace(settings, voice=voice)
    if variants:
        settings = replace(settings, variants=tuple(v.strip() for v in variants.split(",") if v.strip()))
    if speed:
        try:
            low, high = (int(v) for v in speed.split(","))
        except ValueError:
            raise typer.BadParameter(f"{speed!r}: write it as MIN,MAX words per minute, e.g. 135,190") from None
        if not 0 < low <= high:
            raise typer.BadParameter(f"{speed!r}: MIN must be positive and at most MAX, e.g. 135,190")
        settings = replace(settings, speed=(low, high))
    report = run_job(
        lambda: run_loop(out.resolve(), settings, say=lambda m: typer.echo(m, err=True)),
        address=None,
        errors=(FinetuneError, ManifestError, ValueError, OSError),
        as_json=False,
    )
    acc = report.accent
    typer.echo(
        f"accent ({accent_name(acc)}): WER {pct(acc.wer_before)} -> {pct(acc.wer_after)} "
        f"({100 * (acc.relative_reduction or 0):.0f} % lower), {100 * report.review.share:.0f} % of clips reviewed"
    )
    for lang, v in report.original.items():
        typer.echo(f"original {lang}: WER {pct(v.before)} -> {pct(v.after)}")
    promotion = report.model.promotion
    verdict = "promoted" if promotion.refused is None else promotion.refused
    typer.echo(f"model {report.model.version}: {verdict}")
    typer.echo(f"report: {out / 'loop-report.html'}")


def register(app: typer.Typer) -> None:
    app.add_typer(demo_app, name="demo")

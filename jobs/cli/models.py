"""The model commands of ``earmark``: finetune, and models list/show/promote."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from jobs.cli.common import AddressOpt, ExitCode, fail, run_job

if TYPE_CHECKING:
    from jobs.cards import ModelCard
    from jobs.registry import Registry

RegistryOpt = Annotated[
    str,
    typer.Option(
        "--registry", help="Model registry folder: a local path or s3://bucket/prefix.", envvar="EARMARK_REGISTRY"
    ),
]

models_app = typer.Typer(help="List, inspect and promote fine-tuned models in a registry.", no_args_is_help=True)


def finetune(
    train: Annotated[
        list[str], typer.Option("--train", help="Training manifest(s) (NeMo JSON lines; repeat the option).")
    ],
    dev: Annotated[
        list[str],
        typer.Option("--dev", help="Dev manifest(s): the gate compares WER per language on them (repeat the option)."),
    ],
    registry: RegistryOpt,
    base: Annotated[
        str,
        typer.Option("--base", help="'demo', a .nemo path or s3:// URI, or NAME or NAME/VERSION from the registry."),
    ] = "demo",
    name: Annotated[str, typer.Option("--name", help="Model name in the registry.")] = "earmark",
    workers: Annotated[int, typer.Option("--workers", help="Ray Train workers (data parallel).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", help="0 trains on CPUs (gloo).")] = 0.0,
    cpus_per_worker: Annotated[float | None, typer.Option("--cpus-per-worker")] = None,
    max_steps: Annotated[int, typer.Option("--max-steps")] = 300,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warm-up then cosine).")] = 5e-4,
    freeze: Annotated[
        str,
        typer.Option(
            "--freeze",
            help="none | decoder (keep the language model) | encoder (keep the acoustics) | head (train the encoder only)",
        ),
    ] = "none",
    batch_seconds: Annotated[float, typer.Option("--batch-seconds", help="Audio seconds per training batch.")] = 45.0,
    steps_per_checkpoint: Annotated[int, typer.Option("--steps-per-checkpoint")] = 25,
    merge: Annotated[
        float,
        typer.Option("--merge", help="Save (1-m)*base + m*fine-tuned weights (WiSE-FT); below 1 forgets less."),
    ] = 1.0,
    max_failures: Annotated[int, typer.Option("--max-failures", help="Worker-group restarts allowed.")] = 2,
    replay: Annotated[
        list[str] | None,
        typer.Option("--replay", help="Replay manifest(s): clips of what the base knows, mixed in so it keeps it."),
    ] = None,
    anchor: Annotated[
        float,
        typer.Option(
            "--anchor", help="Hold the model's outputs on --replay clips to the base's (weight; 0 = off, e.g. 10)."
        ),
    ] = 0.0,
    anchor_at: Annotated[
        str,
        typer.Option("--anchor-at", help="output (KL of the output distribution) | encoder (encoder output distance)."),
    ] = "output",
    mix: Annotated[
        str | None,
        typer.Option(
            "--mix",
            help="Share of each --train, then --replay, manifest in the batches, e.g. 0.4,0.6 (default: by size).",
        ),
    ] = None,
    address: AddressOpt = None,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart", help="Discard an unfinished run of this model (its driver died) instead of resuming it."
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the model card as JSON.")] = False,
) -> None:
    """Fine-tune a model on Ray Train, evaluate it against its parent, and register it with its card."""
    from asr.train_settings import TrainSettings
    from cluster.storage import StorageOptions
    from jobs.finetune import FinetuneError, FinetuneRequest, run_finetune
    from jobs.registry import RegistryError
    from records.manifest import ManifestError

    try:
        shares = [float(x) for x in mix.split(",")] if mix else None
        settings = TrainSettings(
            max_steps=max_steps, lr=lr, freeze=freeze, batch_duration=batch_seconds,
            steps_per_epoch=steps_per_checkpoint, merge=merge, anchor=anchor, anchor_at=anchor_at,
        )  # fmt: skip
        req = FinetuneRequest(
            train=list(train), replay=list(replay or []), mix=shares, dev=list(dev),
            registry=registry, base=base, name=name, settings=settings, storage=StorageOptions.from_env(),
            workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, max_failures=max_failures,
            restart=restart,
        )  # fmt: skip
    except ValueError as exc:
        fail(str(exc))
    errors = (FinetuneError, ManifestError, RegistryError, ValueError, OSError)
    card = run_job(lambda: run_finetune(req), address=address, errors=errors, as_json=json_out)
    if not json_out:
        _print_comparison(card)


def _print_comparison(card: ModelCard) -> None:
    from rich.console import Console
    from rich.table import Table

    from jobs.evaluate import pct

    new, old = card.metrics.dev.languages, card.metrics.parent_dev.languages
    table = Table(title=f"{card.ref} vs its parent {card.parent.model_id} (dev WER)")
    for col in ("language", "parent", "new", "change"):
        table.add_column(col)
    for lang in sorted(set(new) | set(old), key=lambda k: (k == "all", k)):
        a = old[lang].wer if lang in old else None
        b = new[lang].wer if lang in new else None
        change = "-" if not a or b is None else f"{100 * (b - a) / a:+.0f} %"
        table.add_row(lang, pct(a), pct(b), change)
    Console().print(table)
    gate, training = card.gate, card.training
    typer.echo(
        f"trained {training.steps} steps in {training.train_s:.0f} s on {training.workers} worker(s); "
        + (
            "the gate passes: promote it with `earmark models promote`"
            if gate.passed
            else "the gate refuses it: " + "; ".join(gate.reasons)
        )
    )


@models_app.command("list")
def list_models(
    registry: RegistryOpt, json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """Every version in the registry with its parent, dev WER and promotion."""
    from jobs.evaluate import pct

    reg = _open(registry)
    rows: list[dict[str, Any]] = []
    for name in reg.names():
        promoted = reg.promoted(name)
        for version in reg.versions(name):
            card = reg.card(name, version)
            dev, parent = card.metrics.dev.languages.get("all"), card.metrics.parent_dev.languages.get("all")
            rows.append(
                {
                    "name": name,
                    "version": version,
                    "created_at": card.created_at,
                    "parent": card.parent.ref,
                    "dev_wer": dev.wer if dev else None,
                    "parent_dev_wer": parent.wer if parent else None,
                    "gate": "pass" if card.gate.passed else "refused",
                    "promoted": version == promoted,
                }
            )
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no models in {registry} yet; make one with `earmark finetune`")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models in {registry}")
    for col in ("name", "version", "created", "parent", "dev WER", "parent dev WER", "gate", "promoted"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"], r["version"], str(r["created_at"]), str(r["parent"]), pct(r["dev_wer"]),
            pct(r["parent_dev_wer"]), r["gate"], "yes" if r["promoted"] else "",
        )  # fmt: skip
    Console().print(table)


@models_app.command("show")
def show_model(
    ref: Annotated[str, typer.Argument(help="NAME (the promoted or latest version) or NAME/VERSION.")],
    registry: RegistryOpt,
) -> None:
    """Print a version's card (JSON): base, parent, data and hashes, training, metrics, promotion."""
    from jobs.registry import RegistryError

    reg = _open(registry)
    name, _, version = ref.partition("/")
    try:
        card = reg.card(name, version or None)
    except RegistryError as exc:
        fail(str(exc))
    typer.echo(json.dumps(card.to_dict(), indent=2))


@models_app.command("promote")
def promote_model(
    ref: Annotated[str, typer.Argument(help="NAME/VERSION to promote.")],
    registry: RegistryOpt,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the gate refuses (needs --reason).")] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="Why; recorded in the card and history.")] = None,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Allowed relative WER regression of any one language.")
    ] = 0.10,
) -> None:
    """Make NAME/VERSION the served model: only if its dev WER beats its parent's and no language regresses."""
    from jobs.registry import RegistryError

    name, _, version = ref.partition("/")
    if not version:
        fail(f"{ref}: name the version to promote, e.g. {name}/v0002 (see `earmark models list`)", ExitCode.USAGE)
    reg = _open(registry)
    try:
        record = reg.promote(name, version, force=force, reason=reason, tolerance=tolerance)
    except RegistryError as exc:
        fail(str(exc))
    note = f" (forced: {record.reason})" if record.forced else ""
    typer.echo(f"promoted {name}/{version}{note}")


def _open(registry: str) -> Registry:
    from cluster.storage import StorageOptions
    from jobs.registry import Registry

    return Registry(registry, StorageOptions.from_env())


def register(app: typer.Typer) -> None:
    app.command()(finetune)
    app.add_typer(models_app, name="models")

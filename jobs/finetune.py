"""``earmark finetune``: fine-tune the prompt model on Ray Train, evaluate it, register it.

    earmark finetune --train export/train.jsonl --dev export/dev.jsonl --base demo \\
        --registry models/ --name accent [--workers 2] [--gpus-per-worker 1] [--max-steps 300]

1. The manifests are checked in the driver (every line: audio, duration, text, a locale the base
   model knows) and hashed for the card.
2. Ray Train runs ``TorchTrainer`` over N workers (gloo on CPU, NCCL on GPUs). Each worker
   restores the base ``.nemo`` and trains it with Lightning (``RayDDPStrategy``,
   ``RayLightningEnvironment``, ``RayTrainReportCallback``, ``prepare_trainer``) on NeMo's Lhotse
   prompt dataset (``asr.training``). Manifests and audio on ``s3://`` are staged to each
   worker's disk first. Every ``steps_per_epoch`` steps the workers validate and report a
   checkpoint to the registry's storage (``<registry>/_train/<name>-<version>``); with
   ``FailureConfig`` a killed worker makes Ray restart the group, which resumes from the last
   checkpoint. Rank 0 writes the final ``.nemo`` into the registry. If the driver itself dies,
   the same command run again resumes the unfinished run from its last checkpoint (its
   ``request.json`` must match; a different command is refused unless ``--restart``).
3. The driver evaluates the new model and its parent on the dev manifest with ``earmark
   evaluate`` (same engine, same metrics), then writes the card: the version exists from then on.
   Promotion is a separate, gated step (``earmark models promote``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asr.engine import TranscribeOptions
from asr.train_settings import TrainSettings, check_manifest, epochs_for
from cluster import storage
from jobs.cards import CardMetrics, DataRecord, DevSet, GateVerdict, ModelCard, ParentRef, TrainingRecord
from jobs.evaluate import Evaluation
from jobs.registry import Registry, gate_card, utcnow_iso
from records.manifest import ManifestEntry, manifest_base, read_manifest, write_manifest

log = logging.getLogger(__name__)


class FinetuneError(RuntimeError):
    """The fine-tuning job cannot go on; the message says why and what to do."""


@dataclass
class FinetuneRequest:
    train: list[str]
    #: One or more dev manifests (several are combined into ``<version>/dev.jsonl``): the gate
    #: compares WER per language on them, so include every language that must not regress.
    dev: list[str]
    registry: str
    base: str = "demo"
    name: str = "earmark"
    workers: int = 1
    gpus_per_worker: float = 0.0
    #: CPUs each worker holds (None: the cluster's CPUs shared out, at least one).
    cpus_per_worker: float | None = None
    settings: TrainSettings = field(default_factory=TrainSettings)
    storage: storage.StorageOptions = field(default_factory=storage.StorageOptions)
    #: Worker-group restarts allowed (a killed worker resumes from the last checkpoint).
    max_failures: int = 2
    #: Replay manifests: clips of what the base already knows, trained on after the --train
    #: manifests so that it keeps it; with ``settings.anchor`` the base's outputs on them are kept too.
    replay: list[str] = field(default_factory=list)
    #: Each --train then --replay manifest's share of the training samples (None: by their sizes).
    mix: list[float] | None = None
    att_context: tuple[int, int] | None = None
    #: Discard an unfinished run of this name (its driver died) and start over.
    restart: bool = False


def run_finetune(req: FinetuneRequest) -> ModelCard:
    """Train on the caller's Ray connection, evaluate against the parent, write the model and
    its card; returns the card."""
    started = time.perf_counter()
    registry = Registry(req.registry, req.storage)
    base_uri, parent = _resolve_base(req.base, registry)
    base_local = storage.localize(base_uri, req.storage) if storage.is_remote(base_uri) else Path(base_uri)
    from asr.model import model_id_of_file, read_prompt_dictionary

    prompts = read_prompt_dictionary(base_local)
    if not req.train or not req.dev:
        raise FinetuneError("name at least one --train and one --dev manifest")
    sources = len(req.train) + len(req.replay)
    if req.mix is not None and (len(req.mix) != sources or any(w <= 0 for w in req.mix)):
        raise FinetuneError(
            f"--mix {','.join(map(str, req.mix))}: give one positive share per --train and --replay manifest ({sources})"
        )
    if req.settings.anchor > 0 and not req.replay:
        raise FinetuneError("--anchor holds the base's outputs on replay clips: name them with --replay MANIFEST")
    data = {
        "train": [_describe(uri, prompts, req.storage) for uri in req.train],
        "replay": [_describe(uri, prompts, req.storage) for uri in req.replay],
        "dev": [_describe(uri, prompts, req.storage) for uri in req.dev],
    }
    version = registry.next_version(req.name)
    dev = _combine(req.dev, registry.path(req.name, version, "dev.jsonl"), req.storage)
    run_name = f"{req.name}-{version}"
    model_uri = registry.path(req.name, version, "model.nemo")

    from cluster.runtime import require_ray

    require_ray()
    resumed = _claim_run(req, registry, run_name, _fingerprint(req, parent, data))
    train_started = time.perf_counter()
    result = _train(req, base_uri=base_uri, dev=dev, model_uri=model_uri, run_name=run_name, registry=registry)
    train_s = time.perf_counter() - train_started

    evals = registry.path(req.name, version, "eval")
    metrics_new = _evaluate(req, model_uri, dev, f"{evals}/dev")
    metrics_parent = _evaluate(req, base_uri, dev, f"{evals}/dev-parent")
    dev_sets = {}
    if len(req.dev) > 1:  # each dev manifest is also gated on its own (see registry.gate_card)
        from jobs.evaluate import score_parts

        new, old = (score_parts(m.labels or "", req.dev, req.storage) for m in (metrics_new, metrics_parent))
        dev_sets = {uri: DevSet(new=new[uri].languages, parent=old[uri].languages) for uri in req.dev}
    metrics = CardMetrics(dev=metrics_new, parent_dev=metrics_parent, dev_sets=dev_sets)
    refused = gate_card(metrics)
    local_model = storage.localize(model_uri, req.storage) if storage.is_remote(model_uri) else Path(model_uri)
    card = ModelCard(
        name=req.name,
        version=version,
        model_id=model_id_of_file(local_model, name=f"{req.name}-{version}"),
        created_at=utcnow_iso(),
        base=parent.base or parent.model_id,
        parent=parent,
        data=data,
        training=TrainingRecord(
            settings=req.settings,
            workers=req.workers,
            gpus_per_worker=req.gpus_per_worker,
            mix=req.mix,
            train_s=round(train_s, 1),
            wall_s=round(time.perf_counter() - started, 1),
            steps=result.steps,
            attempts=len(result.attempt_log),
            resumed_from_steps=result.resumed_from_steps,
            attempt_log=result.attempt_log,
            anchor_distance_last_epoch=result.anchor_distance,
            ray_run=run_name,
            resumed_run=resumed,
        ),
        metrics=metrics,
        gate=GateVerdict(passed=not refused, reasons=refused),
    )
    registry.publish_card(req.name, version, card)
    return card


def _fingerprint(req: FinetuneRequest, parent: ParentRef, data: dict[str, list[DataRecord]]) -> dict[str, Any]:
    """What makes two runs the same run: the base, the data's hashes and every training setting."""
    return {
        "base": parent.model_id,
        "data": {k: [(d.uri, d.sha256) for d in v] for k, v in data.items()},
        "settings": req.settings.to_dict(),
        "workers": req.workers,
        "gpus_per_worker": req.gpus_per_worker,
        "mix": req.mix,
        "att_context": list(req.att_context) if req.att_context else None,
    }


def _claim_run(req: FinetuneRequest, registry: Registry, run_name: str, fingerprint: dict[str, Any]) -> bool:
    """Start the Ray Train run ``run_name``, or resume it: an unfinished run of the same request
    (its driver died before the card was written) is resumed from its last checkpoint, which
    Ray Train finds in the run folder; a different request is refused unless ``req.restart``.
    Returns whether the run is resumed."""
    run_dir = registry.path("_train", run_name)
    request_uri = f"{run_dir}/request.json"
    found = (
        json.loads(storage.read_bytes(request_uri, req.storage)) if storage.exists(request_uri, req.storage) else None
    )
    stale = found is not None and found != json.loads(json.dumps(fingerprint))
    if stale and not req.restart:
        raise FinetuneError(
            f"{run_dir} holds an unfinished run of {run_name} with other data or settings (its driver stopped before "
            "the model was registered). Run that command again to resume it, or pass --restart to discard it and "
            "start over"
        )
    if req.restart and found is not None:
        log.warning("discarding the unfinished run in %s (--restart)", run_dir)
        storage.remove_tree(run_dir, req.storage)
        found = None
    if found is None:
        storage.write_bytes(request_uri, json.dumps(fingerprint, indent=2).encode(), req.storage)
        return False
    log.warning("resuming the unfinished run %s from its last checkpoint", run_name)
    return True


def _resolve_base(base: str, registry: Registry) -> tuple[str, ParentRef]:
    """A bundled model's name (``demo``), a path or URI of a .nemo, or ``NAME[/VERSION]`` of the registry."""
    from asr.model import bundled_checkpoints, model_id_of_file

    bundled = bundled_checkpoints().get(base)
    if bundled is not None:
        return str(bundled.path), ParentRef(model_id=model_id_of_file(bundled.path), ref=base)
    if storage.is_remote(base) or base.endswith(".nemo"):
        if not storage.exists(base, registry.options):
            raise FinetuneError(
                f"--base {base}: no such checkpoint; pass 'demo', a .nemo path or URI, or NAME[/VERSION] of the registry"
            )
        local = storage.localize(base, registry.options) if storage.is_remote(base) else Path(base)
        return base, ParentRef(model_id=model_id_of_file(local, name=Path(base).stem), ref=base)
    card = registry.card(*base.split("/", 1)) if "/" in base else registry.card(base)
    uri = registry.path(card.name, card.version, "model.nemo")
    return uri, ParentRef(model_id=card.model_id, ref=card.ref, base=card.base)


def _describe(uri: str, prompts: dict[str, int], options: storage.StorageOptions) -> DataRecord:
    try:
        data = storage.read_bytes(uri, options)
    except storage.StorageError as exc:
        raise FinetuneError(f"manifest {exc}") from exc
    stats = check_manifest(uri, data, prompts)
    return DataRecord(uri, hashlib.sha256(data).hexdigest(), stats.lines, stats.hours, stats.languages)


def _combine(manifests: list[str], target: str, options: storage.StorageOptions) -> str:
    """One manifest for several (audio paths made absolute); a single manifest is used as is."""
    if len(manifests) == 1:
        return manifests[0]
    storage.write_bytes(target, write_manifest(e for uri in manifests for e in _entries(uri, options)), options)
    return target


def _evaluate(req: FinetuneRequest, model: str, manifest: str, out: str) -> Evaluation:
    from jobs.evaluate import run_evaluate
    from jobs.stages import JobSettings

    options = TranscribeOptions(att_context=req.att_context)
    settings = JobSettings(run_id="", model=model, options=options, storage=req.storage)
    return run_evaluate(manifest=manifest, out=out, settings=settings, quiet=True)


# -- Ray Train ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Trained:
    steps: int
    attempt_log: list[dict[str, Any]]
    resumed_from_steps: list[int]
    anchor_distance: float | None


def _train(
    req: FinetuneRequest, *, base_uri: str, dev: str, model_uri: str, run_name: str, registry: Registry
) -> _Trained:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = ray.cluster_resources()
    use_gpu = req.gpus_per_worker > 0
    if use_gpu and resources.get("GPU", 0) < req.gpus_per_worker * req.workers:
        raise FinetuneError(
            f"--workers {req.workers} x --gpus-per-worker {req.gpus_per_worker:g} but the cluster has "
            f"{resources.get('GPU', 0):g} GPUs; lower them or use --gpus-per-worker 0 (CPU, gloo)"
        )
    cpus = req.cpus_per_worker or max(1.0, float(int(resources.get("CPU", 1) // req.workers)))
    per_worker = {"CPU": cpus, **({"GPU": req.gpus_per_worker} if use_gpu else {})}
    fs, train_root = storage.pyarrow_filesystem(registry.path("_train"), req.storage)
    if not storage.is_remote(train_root):
        Path(train_root).mkdir(parents=True, exist_ok=True)
    attempts_uri = registry.path("_train", run_name, "_attempts")
    config = {
        "base": base_uri,
        "train": req.train,
        "replay": req.replay,
        "mix": req.mix,
        "dev": dev,
        "settings": req.settings.to_dict(),
        "storage": req.storage,
        "model_uri": model_uri,
        "attempts_uri": attempts_uri,
        "threads": max(1, int(cpus)),
        "use_gpu": use_gpu,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=req.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=run_name,
            storage_path=train_root,
            storage_filesystem=fs if storage.is_remote(registry.uri) else None,
            failure_config=FailureConfig(max_failures=req.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; the user needs the cause and the way out
        raise FinetuneError(f"training failed: {_root_cause(exc)}. Fix it and run the same command again") from exc
    if result.error is not None:
        raise FinetuneError(f"training failed: {_root_cause(result.error)}")
    attempts = [
        json.loads(storage.read_bytes(uri, req.storage))
        for uri in (
            storage.list_files(attempts_uri, req.storage)
            if storage.is_remote(attempts_uri) or Path(attempts_uri).is_dir()
            else []
        )
    ]
    if not storage.exists(model_uri, req.storage):
        raise FinetuneError(f"training ended but wrote no model at {model_uri}; see the Ray logs")
    metrics = result.metrics or {}
    return _Trained(
        steps=int(metrics.get("step", 0)),
        attempt_log=attempts,
        resumed_from_steps=sorted(a["resumed_from_step"] for a in attempts if a.get("resumed_from_step")),
        anchor_distance=metrics.get("train_anchor_distance"),
    )


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: restore the base, train with Lightning under Ray's DDP, report checkpoints."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory(prefix=f"earmark-finetune-{rank}-") as work:  # staged data, resume copy
        _train_in(config, Path(work))


def _train_in(config: dict[str, Any], work: Path) -> None:
    import lightning.pytorch as pl
    import ray.train
    import torch
    from omegaconf import OmegaConf
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    from asr.train_settings import data_config, optim_config
    from asr.training import attach_anchor, merge_into, prepare_model

    torch.set_num_threads(config["threads"])
    settings = TrainSettings(**config["settings"])
    opts: storage.StorageOptions = config["storage"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    train = [stage_manifest(uri, work / "data", opts) for uri in config["train"]]
    replay = [stage_manifest(uri, work / "data", opts) for uri in config.get("replay", [])]
    dev = stage_manifest(config["dev"], work / "data", opts)
    base = config["base"]
    base_local = storage.localize(base, opts) if storage.is_remote(base) else Path(base)

    from nemo.collections.asr.models import ASRModel

    device = "cuda" if config["use_gpu"] else "cpu"
    model = ASRModel.restore_from(str(base_local), map_location=device).float()
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if settings.merge < 1 else {}
    trainer = pl.Trainer(
        max_steps=settings.max_steps,
        max_epochs=epochs_for(settings),
        limit_train_batches=settings.steps_per_epoch,
        limit_val_batches=settings.val_batches,
        accelerator="gpu" if config["use_gpu"] else "cpu",
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=[RayTrainReportCallback()],
        use_distributed_sampler=False,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=settings.steps_per_epoch,
        gradient_clip_val=1.0,
    )
    trainer = prepare_trainer(trainer)
    model.set_trainer(trainer)
    # NeMo counts devices x nodes of the Lightning trainer (1 x 1 per Ray worker); the Lhotse
    # sampler shards by rank, so it needs Ray's world size.
    model.world_size = ctx.get_world_size()
    prepare_model(model, settings, on_gpu=config["use_gpu"])
    if settings.anchor > 0:
        base_model = ASRModel.restore_from(str(base_local), map_location=device).float()
        attach_anchor(model, base_model, settings.anchor, at=settings.anchor_at)
    model.setup_training_data(
        OmegaConf.create(data_config(train + replay, model, settings, train=True, mix=config.get("mix"), replay=replay))
    )
    model.setup_validation_data(OmegaConf.create(data_config([dev], model, settings, train=False)))
    model.setup_optimization(OmegaConf.create(optim_config(settings)))

    ckpt_path, resumed_from = None, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        local = work / "resume"
        checkpoint.to_directory(str(local))
        ckpt_path = str(local / RayTrainReportCallback.CHECKPOINT_NAME)
        resumed_from = int(torch.load(ckpt_path, map_location="cpu", weights_only=False).get("global_step", 0))
    if rank == 0:
        import torch.distributed as dist

        record = {
            "at": utcnow_iso(),
            "resumed_from_step": resumed_from,
            "pid": os.getpid(),
            "world_size": ctx.get_world_size(),
            "backend": dist.get_backend() if dist.is_initialized() else None,
        }
        storage.write_bytes(
            f"{config['attempts_uri']}/{time.time_ns()}-{uuid.uuid4().hex[:6]}.json", json.dumps(record).encode(), opts
        )
    trainer.fit(model, ckpt_path=ckpt_path)
    if rank == 0:
        out = work / "model.nemo"
        merge_into(model, base_state, settings.merge)
        model.save_to(str(out))
        storage.upload_file(out, config["model_uri"], opts)


def stage_manifest(uri: str, folder: Path, options: storage.StorageOptions) -> str:
    """A local copy of the manifest ``uri`` whose audio paths are absolute local files (audio on
    ``s3://`` is downloaded once into earmark's cache); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = [
        e.with_audio(str(storage.localize(e.audio_filepath, options))) if storage.is_remote(e.audio_filepath) else e
        for e in _entries(uri, options)
    ]
    target = folder / f"{uuid.uuid4().hex[:8]}-{uri.rsplit('/', 1)[-1]}"
    target.write_bytes(write_manifest(entries))
    return str(target)


def _entries(uri: str, options: storage.StorageOptions) -> list[ManifestEntry]:
    """The lines of the manifest ``uri`` with audio paths resolved as NeMo resolves them
    (relative to the manifest; absolute local paths or URIs)."""
    return read_manifest(storage.read_bytes(uri, options), base=manifest_base(uri), name=uri)

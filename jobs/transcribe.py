"""``earmark transcribe``: an archive in, pseudo-labels out, on Ray Data, exactly once.

    plan (driver, streaming)     shards = byte ranges of a manifest (a listing is written as one)
      -> ReadStage   (CPU tasks)   one row per input clip
      -> DecodeStage (CPU tasks)   audio decoded once, resampled, long recordings split at pauses
      -> TranscribeStage (actors)  the engine, loaded once per actor, batches packed by duration
      -> ShardCommitter (driver)   one Parquet part per complete shard, atomically

Waveforms go from decode tasks to actors through Ray's object store, never through the driver;
the driver sees result rows only. Rerunning the same command resumes: finished shards are
skipped, and a finished job does no model work at all.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

import pyarrow as pa

from cluster import storage
from cluster.retry import RETRIES
from jobs import clips
from jobs.commit import META_DIR, ShardCommitter, done_shards, join
from jobs.progress import NODE, Progress, RunStats
from jobs.stages import BOOKKEEPING, DecodeStage, JobSettings, ReadStage, TranscribeStage, rows_of
from records.manifest import is_manifest
from records.pseudo_labels import COL, SCHEMA, STATUS_OK

log = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema(
    [*SCHEMA, *(pa.field(name, pa.int64()) for name in BOOKKEEPING), pa.field(NODE, pa.string())],
    metadata=SCHEMA.metadata,
)


class JobError(RuntimeError):
    """The job cannot start or go on; the message says what to change."""


@dataclass(frozen=True, slots=True)
class TranscribeRequest:
    input: str
    out: str
    settings: JobSettings
    actors: int | None = None
    gpus_per_actor: float | None = None
    #: Input clips per shard (the unit of commit and of resume).
    lines_per_shard: int = 256
    #: Rows handed to an actor per call (the engine packs them by duration).
    batch_rows: int = 64
    quiet: bool = False


@dataclass(frozen=True, slots=True)
class RunPlan:
    """``OUT/_earmark/run.json``: what a job was asked to do, checked when it is run again."""

    run_id: str
    input: str
    #: The manifest the shards are cut from (the input, or the listing of a folder or prefix).
    manifest: str
    manifest_size: int
    shard_bytes: int
    #: The settings that must not change between a run and its resumption.
    settings: dict[str, Any]
    started_at: str

    def shards(self, options: storage.StorageOptions | None = None) -> list[clips.Shard]:
        return clips.plan_shards(self.manifest, shard_bytes=self.shard_bytes, options=options)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class RunFigures:
    """What this run of the job did (a resumed job counts only its own work)."""

    rows_transcribed: int
    audio_hours: float
    wall_s: float
    rtfx: float
    clips_per_node: dict[str, int]
    #: transient storage faults the driver retried (listing, parts, summary); workers log theirs
    storage_retries: int = 0


@dataclass(frozen=True, slots=True)
class TranscribeSummary:
    """``OUT/_earmark/summary.json``: every part in the output folder, not only this run's."""

    input: str
    out: str
    run_id: str
    model_ids: list[str]
    settings: dict[str, Any]
    rows: int
    unique_clip_ids: int
    items: int
    clips_ok: int
    clips_error: int
    audio_hours: float
    per_language: dict[str, int]
    confidence_quantiles: dict[str, float]
    error_examples: list[str]
    this_run: RunFigures
    finished_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_transcribe(req: TranscribeRequest) -> TranscribeSummary:
    """Run (or resume) the job on the caller's Ray connection and return its summary (also
    written to ``OUT/_earmark/summary.json``)."""
    started = time.perf_counter()
    opts = req.settings.storage
    run = _prepare_run(req)
    settings = replace(req.settings, run_id=run.run_id)
    shards = run.shards(opts)
    done = done_shards(req.out, opts)
    pending = [s for s in shards if s.index not in done]
    stats = RunStats()
    if pending:
        log.info("%d of %d shards to do", len(pending), len(shards))
        _process(req, settings, pending, run, resumed=len(pending) < len(shards), stats=stats)
    summary = write_summary(req.out, run=run, stats=stats, wall_s=time.perf_counter() - started, options=opts)
    storage.write_bytes(join(req.out, "_SUCCESS"), b"", opts)
    return summary


def _finished_so_far(out: str, options: storage.StorageOptions | None) -> RunStats:
    """What the parts already in ``out`` hold (a resumed job's bar starts there)."""
    import pyarrow.dataset as pads

    fs, root = storage.pyarrow_filesystem(out, options)
    table = storage.pyarrow_call(
        out,
        lambda: pads.dataset(root, filesystem=fs, format="parquet", schema=SCHEMA).to_table(
            columns=[COL.status, COL.duration_s, COL.segment_index]
        ),
    )
    stats = RunStats()
    stats.add(table)
    return stats


def resume_settings(settings: JobSettings) -> dict[str, Any]:
    """The settings a rerun must share with the run it resumes (``run.json``'s ``settings``)."""
    att = settings.options.att_context
    return {
        "lang": settings.options.lang,
        "model": settings.model,
        "att_context": None if att is None else list(att),
        "max_segment_s": settings.max_segment_s,
        "model_sha256": _model_sha(settings.model),
    }


def _prepare_run(req: TranscribeRequest) -> RunPlan:
    """Read ``run.json`` (a resumed job) or write it (a new one), planning the input once."""
    opts = req.settings.storage
    run_uri = join(req.out, META_DIR, "run.json")
    wanted = resume_settings(req.settings)
    if storage.exists(run_uri, opts):
        run = RunPlan.from_dict(json.loads(storage.read_bytes(run_uri, opts)))
        if run.input != req.input or run.settings != wanted:
            raise JobError(
                f"{req.out} holds a job of {run.input} with {run.settings}; this one is {req.input} with {wanted}. "
                "Rerun with the same input and options to resume it, or choose another --out."
            )
        if storage.size(run.manifest, opts) != run.manifest_size:
            raise JobError(
                f"{run.manifest} changed since this job started; the finished parts would not match it. "
                "Choose another --out for the new manifest."
            )
        return run
    if is_manifest(req.input):
        if not storage.exists(req.input, opts):
            raise JobError(f"{req.input}: no such manifest; check the path")
        manifest = req.input if storage.is_remote(req.input) else _abspath(req.input)
    else:
        manifest = join(req.out, META_DIR, "inputs.jsonl")
        try:
            clips.write_listing(req.input, manifest, opts)
        except (clips.InputError, storage.StorageError) as exc:
            raise JobError(str(exc)) from None
    try:
        shard_bytes = clips.estimate_shard_bytes(manifest, lines_per_shard=req.lines_per_shard, options=opts)
        size = storage.size(manifest, opts)
        if size == 0:
            raise clips.InputError(f"{manifest}: the manifest is empty; give it one JSON object per line")
    except (clips.InputError, storage.StorageError) as exc:
        raise JobError(str(exc)) from None
    run = RunPlan(
        run_id=dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6],
        input=req.input,
        manifest=manifest,
        manifest_size=size,
        shard_bytes=shard_bytes,
        settings=wanted,
        started_at=dt.datetime.now(dt.UTC).isoformat(),
    )
    storage.write_bytes(run_uri, json.dumps(asdict(run), indent=2).encode(), opts)
    return run


def _process(
    req: TranscribeRequest,
    settings: JobSettings,
    pending: list[clips.Shard],
    run: RunPlan,
    *,
    resumed: bool,
    stats: RunStats,
) -> None:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from cluster.runtime import plan_actors, require_ray

    require_ray()
    resources = ray.cluster_resources()
    plan = plan_actors(
        actors=req.actors,
        gpus_per_actor=req.gpus_per_actor,
        cluster_cpus=resources.get("CPU", 1),
        cluster_gpus=resources.get("GPU", 0),
        node_cpus=[n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")],
    )
    settings = replace(settings, threads=plan.threads)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False

    ds: ray.data.Dataset = ray.data.from_items([asdict(s) for s in pending], override_num_blocks=len(pending))
    # read and decode book the same CPU, so Ray Data fuses them into one task per shard (one
    # worker process fewer to start while the actors load their model)
    # A read that fails on an unreachable store is retried inside the task (cluster.retry) for the
    # budget, then fails the task and the job (status 4; a rerun resumes): never an error row.
    # (Ray Data 2.60 deprecates per-stage retry_exceptions, removed in 2.64.)
    ds = ds.flat_map(ReadStage(settings), num_cpus=1)
    ds = ds.flat_map(DecodeStage(settings), num_cpus=1)
    ds = ds.map_batches(
        _TranscribeActor,
        fn_constructor_kwargs={"settings": settings},
        compute=ActorPoolStrategy(size=plan.actors),
        batch_size=req.batch_rows,
        batch_format="numpy",
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor or None,
        # Ray Data places actors with SPREAD by default (one model per node before two on one);
        # naming it here is deprecated in Ray 2.60
    )
    committer = ShardCommitter(req.out, options=settings.storage)
    total_items, total_audio = clips.count_lines(run.manifest, settings.storage)
    prior = _finished_so_far(req.out, settings.storage) if resumed else RunStats()
    with Progress(
        quiet=req.quiet, total_audio_s=total_audio, total_items=total_items, plan=plan.describe(), prior=prior
    ) as bar:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            stats.add(batch)
            committer.add(batch)
            bar.update(stats)
    unseen = [s.index for s in pending if s.index not in committer.committed]
    stuck = [i for i in unseen if i in committer.pending]
    if stuck:
        raise JobError(f"shards {stuck[:5]} came back incomplete; rerun the same command to redo them")
    for index in unseen:  # byte ranges that held no line start
        committer.write_empty(index)


class _TranscribeActor:
    """The Ray actor around :class:`TranscribeStage`: model loaded once, rows out as Arrow.

    The model loads and computes on one thread of the actor's own. Ray Data constructs the actor
    on the worker's main thread but calls it from a thread of its own, and torch's CPU compute ran
    about half as fast on a thread other than the one that loaded the model (the extra time went
    to the kernel, without page faults; busy-waiting OpenMP threads made it worse). Measured on the
    benchmark's 297 segments in a Ray actor on 2 cores: 4.3-5.0 s split across two threads, 2.1-2.3 s
    on one.
    """

    def __init__(self, settings: JobSettings) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import ray

        self.node = ray.get_runtime_context().get_node_id()
        self.stage = TranscribeStage(settings)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="earmark-engine")
        self.thread.submit(self.stage.setup).result()  # a model that cannot load fails the actor here

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        rows = self.thread.submit(self.stage.process_rows, rows_of(batch)).result()
        for row in rows:
            row[NODE] = self.node
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def write_summary(
    out: str, *, run: RunPlan, stats: RunStats, wall_s: float, options: storage.StorageOptions | None
) -> TranscribeSummary:
    """Summarize every part in ``out`` (not only this run's) into ``_earmark/summary.json``."""
    import numpy as np
    import pyarrow.dataset as pads

    fs, root = storage.pyarrow_filesystem(out, options)
    columns = [COL.clip_id, COL.item_id, COL.status, COL.error, COL.duration_s, COL.lang_detected, COL.confidence]
    table = storage.pyarrow_call(
        out,
        lambda: pads.dataset(root, filesystem=fs, format="parquet", schema=SCHEMA).to_table(
            columns=[*columns, COL.model_id]
        ),
    )
    ok = [s == STATUS_OK for s in table.column(COL.status).to_pylist()]
    durations = table.column(COL.duration_s).to_pylist()
    audio_s = sum(d or 0.0 for d, k in zip(durations, ok, strict=True) if k)
    langs = Counter(lang for lang, k in zip(table.column(COL.lang_detected).to_pylist(), ok, strict=True) if k)
    conf = np.array([c for c in table.column(COL.confidence).to_pylist() if c is not None], dtype=float)
    errors = [e for e, k in zip(table.column(COL.error).to_pylist(), ok, strict=True) if not k]
    summary = TranscribeSummary(
        input=run.input,
        out=out,
        run_id=run.run_id,
        model_ids=sorted({m for m in table.column(COL.model_id).to_pylist() if m}),
        settings=run.settings,
        rows=table.num_rows,
        unique_clip_ids=len(set(table.column(COL.clip_id).to_pylist())),
        items=len(set(table.column(COL.item_id).to_pylist())),
        clips_ok=sum(ok),
        clips_error=len(ok) - sum(ok),
        audio_hours=audio_s / 3600,
        per_language={str(k): v for k, v in sorted(langs.items(), key=lambda kv: -kv[1])},
        confidence_quantiles=(
            {f"p{int(q * 100):02d}": float(np.quantile(conf, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
            if len(conf)
            else {}
        ),
        error_examples=errors[:5],
        this_run=RunFigures(
            rows_transcribed=stats.rows,
            audio_hours=stats.audio_s / 3600,
            wall_s=wall_s,
            rtfx=stats.audio_s / wall_s if wall_s > 0 else 0.0,
            clips_per_node=dict(stats.nodes),
            storage_retries=RETRIES.value,
        ),
        finished_at=dt.datetime.now(dt.UTC).isoformat(),
    )
    storage.write_bytes(join(out, META_DIR, "summary.json"), json.dumps(summary.to_dict(), indent=2).encode(), options)
    return summary


def _model_sha(spec: str) -> str | None:
    """The checkpoint's content hash when it is a local file (so a retrained model is not mixed in)."""
    from pathlib import Path

    from asr.model import ModelLoadError, file_sha256, resolve_checkpoint

    if storage.is_remote(spec):
        return None  # checked by the actors, which fetch it into their node's cache
    try:
        path = resolve_checkpoint(spec)
    except ModelLoadError as exc:  # fail before starting Ray, not inside an actor
        raise JobError(str(exc)) from None
    return file_sha256(path) if isinstance(path, Path) else None


def _abspath(path: str) -> str:
    from pathlib import Path

    return str(Path(path).resolve())

"""The stages of batch transcription as plain classes: they run and test without Ray.

``jobs/transcribe.py`` maps them onto Ray Data (read and decode on CPU tasks, transcription in an
actor pool); the tests also call them directly. Rows between stages are plain dicts of Arrow-
friendly values; the last stage emits rows of the pseudo-label table
(:mod:`labeling.pseudo_labels`) plus three bookkeeping columns the committer uses
(:data:`BOOKKEEPING`).

* :class:`ReadStage`: a shard of the plan -> one row per input clip (a bad manifest line becomes
  an error row).
* :class:`DecodeStage`: an input clip -> its audio, once, at 16 kHz mono; recordings longer than
  30 s are split at pauses (Silero VAD) into segments, one row each. Undecodable input becomes
  an error row that carries the reason.
* :class:`TranscribeStage`: a batch of segment rows -> pseudo-label rows. The model loads once,
  in :meth:`TranscribeStage.setup`; clips are packed by duration inside the engine.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.storage import StorageError, StorageOptions
from jobs.clips import ClipRef, InputError, Shard, clip_id, read_shard
from labeling.pseudo_labels import STATUS_ERROR, STATUS_OK

log = logging.getLogger(__name__)

#: Columns that ride along with result rows so the driver knows when a shard is complete.
BOOKKEEPING = ("shard", "shard_items", "item_index")
SAMPLE_RATE = 16_000


@dataclass(frozen=True, slots=True)
class JobSettings:
    """What every stage needs to know about the job (picklable; sent to Ray workers)."""

    run_id: str
    lang: str = "auto"
    model: str = "demo"
    att_context: tuple[int, int] | None = None
    #: padded audio seconds per forward pass (None: the engine's default for its device)
    batch_seconds: float | None = None
    max_segment_s: float = 30.0
    device: str | None = None
    #: torch threads in a CPU actor (None = torch's default)
    threads: int | None = None
    storage: StorageOptions = field(default_factory=StorageOptions)


class ReadStage:
    """A shard of the plan -> one row per input clip."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings

    def __call__(self, shard_row: dict[str, Any]) -> list[dict[str, Any]]:
        shard = Shard(**{k: shard_row[k] for k in ("index", "manifest", "start", "end", "total")})
        items: list[ClipRef | InputError] = []
        try:
            for ref in read_shard(
                shard, default_lang=self.settings.lang, errors="yield", options=self.settings.storage
            ):
                items.append(ref)
        except StorageError as exc:  # the manifest itself went away: fail loudly, it is not a clip
            raise RuntimeError(f"cannot read shard {shard.name} of {shard.manifest}: {exc}") from exc
        rows = []
        for k, ref in enumerate(items):
            row = {"shard": shard.index, "shard_items": len(items), "item_index": k}
            if isinstance(ref, InputError):
                where = f"{shard.manifest}#byte={ref.byte}"
                row |= {"source_uri": where, "offset_s": 0.0, "duration_s": None, "lang": self.settings.lang}
                row |= {"ref_text": None, "error": str(ref)}
            else:
                row |= {"source_uri": ref.source_uri, "offset_s": ref.offset_s, "duration_s": ref.duration_s}
                row |= {"lang": ref.lang or self.settings.lang, "ref_text": ref.text, "error": None}
            rows.append(row)
        return rows


class DecodeStage:
    """An input clip -> rows of 16 kHz mono audio, split at pauses when longer than 30 s."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        self._sources: _SourceCache | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "_sources": None}  # the cache stays in its process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.settings, self._sources = state["settings"], None

    def __call__(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        from asr.audio import AudioError, decode_audio
        from asr.vad import split_long_audio

        if self._sources is None:
            self._sources = _SourceCache(self.settings.storage)

        item_id = clip_id(item["source_uri"], item["offset_s"], item["duration_s"])
        base = {k: item[k] for k in (*BOOKKEEPING, "source_uri", "lang", "ref_text")} | {"item_id": item_id}
        if item["error"] is not None:
            return [self._error(base, item, item["error"])]
        try:
            source, source_hash = self._sources.get(item["source_uri"])
            audio = decode_audio(source, offset_s=item["offset_s"], duration_s=item["duration_s"])
            spans = split_long_audio(audio, max_s=self.settings.max_segment_s)
        except (AudioError, StorageError) as exc:
            return [self._error(base, item, str(exc))]
        except Exception as exc:  # noqa: BLE001 - whatever a strange file does, it costs one row, not the job
            log.warning("unexpected failure decoding %s", item["source_uri"], exc_info=True)
            return [self._error(base, item, f"{item['source_uri']}: could not decode ({type(exc).__name__}: {exc})")]
        if not spans:  # a long recording in which the VAD heard no speech: one empty, ok row
            spans, silent = [(0.0, len(audio) / SAMPLE_RATE)], True
        else:
            silent = False
        rows = []
        for k, (start, end) in enumerate(spans):
            offset = round(item["offset_s"] + start, 3)
            duration = round(end - start, 3)
            whole = len(spans) == 1 and not silent and start == 0.0
            a, b = int(round(start * SAMPLE_RATE)), int(round(end * SAMPLE_RATE))
            rows.append(
                base
                | {
                    "clip_id": item_id if whole else clip_id(item["source_uri"], offset, duration),
                    "source_hash": source_hash,
                    "offset_s": item["offset_s"] if whole else offset,
                    "duration_s": round(len(audio) / SAMPLE_RATE, 3) if whole else duration,
                    "segment_index": k,
                    "segment_count": len(spans),
                    "status": STATUS_OK,
                    "error": None,
                    "speech": not silent,
                    "audio": np.zeros(0, np.float32) if silent else audio[a:b],
                }
            )
        return rows

    @staticmethod
    def _error(base: dict[str, Any], item: dict[str, Any], reason: str) -> dict[str, Any]:
        return base | {
            "clip_id": base["item_id"],
            "source_hash": None,
            "offset_s": item["offset_s"],
            "duration_s": item["duration_s"],
            "segment_index": 0,
            "segment_count": 1,
            "status": STATUS_ERROR,
            "error": reason,
            "speech": False,
            "audio": np.zeros(0, np.float32),
        }


class _SourceCache:
    """Local files are decoded from their path (segments are read without the rest); S3 objects
    are fetched once and kept (up to ~256 MB) so many segments of one recording cost one GET."""

    def __init__(self, options: StorageOptions, budget: int = 256 << 20) -> None:
        self.options = options
        self.budget = budget
        self._bytes: collections.OrderedDict[str, tuple[bytes, str]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, uri: str) -> tuple[Any, str]:
        import hashlib

        from asr.model import file_sha256
        from cluster import storage

        if not storage.is_remote(uri):
            path = Path(uri)
            if not path.is_file():
                raise StorageError(uri, "no such file; check the path (relative paths are relative to the manifest)")
            return path, file_sha256(path)
        with self._lock:
            if uri in self._bytes:
                self._bytes.move_to_end(uri)
                return self._bytes[uri]
        data = storage.read_bytes(uri, self.options)
        entry = (data, hashlib.sha256(data).hexdigest())
        with self._lock:
            self._bytes[uri] = entry
            while sum(len(d) for d, _ in self._bytes.values()) > self.budget and len(self._bytes) > 1:
                self._bytes.popitem(last=False)
        return entry


class TranscribeStage:
    """Segment rows -> pseudo-label rows, with the engine loaded once per process."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        self.engine: Any = None

    def setup(self) -> None:
        from asr.engine import Transcriber
        from cluster.storage import is_remote, localize

        if self.settings.threads:
            import torch

            torch.set_num_threads(self.settings.threads)
        spec = self.settings.model
        spec = str(localize(spec, self.settings.storage)) if is_remote(spec) else spec
        self.engine = Transcriber.load(spec, device=self.settings.device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        if self.engine is None:
            self.setup()
        rows = rows_of(batch)
        out = self.process_rows(rows)
        return {k: [r[k] for r in out] for k in out[0]} if out else {}

    def process_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from asr.engine import TranscribeOptions

        options = TranscribeOptions(
            lang=self.settings.lang, att_context=self.settings.att_context, batch_seconds=self.settings.batch_seconds
        )
        todo = [i for i, r in enumerate(rows) if r["status"] == STATUS_OK and r["speech"]]
        results: dict[int, Any] = {}
        try:
            got = self.engine.transcribe(
                [rows[i]["audio"] for i in todo], langs=[rows[i]["lang"] for i in todo], options=options
            )
            results = dict(zip(todo, got, strict=True))
        except Exception:  # one bad clip must not sink the batch: retry clip by clip
            log.warning("batch of %d clips failed; retrying one by one", len(todo), exc_info=True)
            for i in todo:
                try:
                    (results[i],) = self.engine.transcribe([rows[i]["audio"]], langs=[rows[i]["lang"]], options=options)
                except Exception as exc:  # noqa: BLE001 - the reason goes into the row
                    results[i] = exc
        now = dt.datetime.now(dt.UTC)
        return [self._to_row(row, results.get(i), now) for i, row in enumerate(rows)]

    def _to_row(self, row: dict[str, Any], result: Any, now: dt.datetime) -> dict[str, Any]:
        out = {k: row[k] for k in (*BOOKKEEPING, "clip_id", "item_id", "source_uri", "source_hash", "ref_text")}
        out |= {k: row[k] for k in ("offset_s", "duration_s", "segment_index", "segment_count", "status", "error")}
        out |= {
            "lang_requested": row["lang"],
            "model_id": self.engine.model_id,
            "att_context": list(self.engine.resolve_att_context(self.settings.att_context)),
            "run_id": self.settings.run_id,
            "created_at": now,
            "text": None,
            "text_raw": None,
            "lang_detected": None,
            "sentences": [],
            "words": [],
            "confidence": None,
        }
        if isinstance(result, Exception):
            return out | {"status": STATUS_ERROR, "error": _describe(result, row)}
        if row["status"] == STATUS_OK and result is None:  # silent recording
            return out | {"text": "", "text_raw": ""}
        if result is None:
            return out
        return out | {
            "text": result.text,
            "text_raw": result.text_raw,
            "lang_requested": result.lang_requested,
            "lang_detected": result.lang_detected,
            "sentences": [
                {"text": s.text, "lang": s.lang, "start_s": s.start_s, "end_s": s.end_s, "confidence": s.confidence}
                for s in result.sentences
            ],
            "words": [
                {"word": w.word, "start_s": w.start_s, "end_s": w.end_s, "confidence": w.confidence}
                for w in result.words
            ],
            "confidence": result.confidence,
        }


def _describe(exc: Exception, row: dict[str, Any]) -> str:
    if isinstance(exc, ValueError):
        return str(exc)
    return f"transcription failed ({type(exc).__name__}: {exc}); the clip is {row['duration_s']} s from {row['source_uri']}"


def rows_of(batch: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _plain(batch[k][i]) for k in keys} for i in range(n)]


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values (Arrow round-trips give numpy types)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:  # Arrow nulls come back as NaN in float columns
        return None
    return value

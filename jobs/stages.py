"""The stages of batch transcription as plain classes: they run and test without Ray.

``jobs/transcribe.py`` maps them onto Ray Data (read and decode on CPU tasks, transcription in an
actor pool); the tests also call them directly. Between stages a row is a record of
:mod:`records.pseudo_labels` as a plain dict (``to_row``), plus three bookkeeping columns the
committer uses (:data:`BOOKKEEPING`) and, between decode and transcription, the audio.

* :class:`ReadStage`: a shard of the plan -> one :class:`~records.pseudo_labels.Segment` per
  input clip (a bad manifest line becomes a segment that carries its error).
* :class:`DecodeStage`: an input clip -> its audio, once, at 16 kHz mono; recordings longer than
  30 s are split at pauses (Silero VAD) into segments, one row each. Undecodable input becomes
  a segment that carries the reason.
* :class:`TranscribeStage`: a batch of segment rows -> :class:`~records.pseudo_labels.PseudoLabel`
  rows. The model loads once, in :meth:`TranscribeStage.setup`; clips are packed by duration
  inside the engine.
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

from asr.engine import TranscribeOptions
from cluster.storage import StorageError, StorageOptions
from jobs.clips import InputError, Shard, read_shard
from records.clips import ClipRef
from records.pseudo_labels import PseudoLabel, Segment, plain

log = logging.getLogger(__name__)

#: Columns that ride along with result rows so the driver knows when a shard is complete.
BOOKKEEPING = ("shard", "shard_items", "item_index")
#: Columns between decode and transcription: the audio, and whether it holds speech at all.
AUDIO, SPEECH = "audio", "speech"
SAMPLE_RATE = 16_000


@dataclass(frozen=True, slots=True)
class JobSettings:
    """What every stage needs to know about the job (picklable; sent to Ray workers)."""

    run_id: str
    model: str = "demo"
    #: How the engine transcribes (language, latency mode, batch size): passed to it as is.
    options: TranscribeOptions = field(default_factory=TranscribeOptions)
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
        lang = self.settings.options.lang
        try:
            items = list(read_shard(shard, default_lang=lang, errors="yield", options=self.settings.storage))
        except StorageError as exc:  # the manifest itself went away: fail loudly, it is not a clip
            raise StorageError(exc.uri, f"{exc.problem} (reading shard {shard.name})", exc.transient) from exc
        rows = []
        for k, ref in enumerate(items):
            # a bad manifest line is a clip too: its place in the manifest, and why it cannot be read
            if isinstance(ref, InputError):
                ref, error = ClipRef(f"{shard.manifest}#byte={ref.byte}", lang=lang), str(ref)
            else:
                error = None
            item = ref.clip_id
            segment = Segment(
                item, item, ref.source_uri, None, ref.offset_s, ref.duration_s, 0, 1, ref.lang or lang, ref.text, error
            )
            rows.append(segment.to_row() | {"shard": shard.index, "shard_items": len(items), "item_index": k})
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

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        from asr.audio import AudioError, decode_audio
        from asr.vad import span_audio, split_long_audio

        if self._sources is None:
            self._sources = _SourceCache(self.settings.storage)
        item = Segment.from_row(row)
        keep = {k: row[k] for k in BOOKKEEPING}
        if item.error is not None:
            return [_with_audio(item, keep, None)]
        try:
            source, source_hash = self._sources.get(item.source_uri)
            audio = decode_audio(source, offset_s=item.offset_s, duration_s=item.duration_s)
            spans = split_long_audio(audio, max_s=self.settings.max_segment_s)
        except StorageError as exc:
            if exc.transient:  # the store is down (after retrying for the budget), the file is not bad
                raise
            return [_with_audio(item.with_error(str(exc)), keep, None)]
        except AudioError as exc:
            return [_with_audio(item.with_error(str(exc)), keep, None)]
        except Exception as exc:  # noqa: BLE001 - whatever a strange file does, it costs one row, not the job
            log.warning("unexpected failure decoding %s", item.source_uri, exc_info=True)
            reason = f"{item.source_uri}: could not decode ({type(exc).__name__}: {exc})"
            return [_with_audio(item.with_error(reason), keep, None)]
        item = item.with_source_hash(source_hash)
        length_s = round(len(audio) / SAMPLE_RATE, 3)
        if not spans:  # a long recording in which the VAD heard no speech: one empty, ok row
            return [_with_audio(item.with_span(0.0, length_s, 0, 1), keep, np.zeros(0, np.float32), speech=False)]
        if len(spans) == 1 and spans[0][0] == 0.0:  # the whole clip: it keeps the input line's id
            return [_with_audio(item.with_duration(length_s), keep, audio)]
        rows = []
        for k, (start, end) in enumerate(spans):
            segment = item.with_span(start, end - start, k, len(spans))
            rows.append(_with_audio(segment, keep, span_audio(audio, start, end)))
        return rows


def _with_audio(
    segment: Segment, keep: dict[str, Any], audio: np.ndarray | None, *, speech: bool = True
) -> dict[str, Any]:
    """The row handed to the model actors: the segment, bookkeeping, its audio."""
    samples = np.zeros(0, np.float32) if audio is None else audio
    return segment.to_row() | keep | {AUDIO: samples, SPEECH: speech and audio is not None}


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

    def process_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows of segments (with their audio) -> pseudo-label rows with the bookkeeping kept."""
        if self.engine is None:
            self.setup()
        options = self.settings.options
        segments = [Segment.from_row(row) for row in rows]
        todo = [i for i, (seg, row) in enumerate(zip(segments, rows, strict=True)) if seg.error is None and row[SPEECH]]
        results: dict[int, Any] = {}
        try:
            got = self.engine.transcribe(
                [rows[i][AUDIO] for i in todo], langs=[segments[i].lang_requested for i in todo], options=options
            )
            results = dict(zip(todo, got, strict=True))
        except Exception:  # one bad clip must not sink the batch: retry clip by clip
            log.warning("batch of %d clips failed; retrying one by one", len(todo), exc_info=True)
            for i in todo:
                try:
                    (results[i],) = self.engine.transcribe(
                        [rows[i][AUDIO]], langs=[segments[i].lang_requested], options=options
                    )
                except Exception as exc:  # noqa: BLE001 - the reason goes into the row
                    results[i] = exc
        now = dt.datetime.now(dt.UTC)
        att = self.engine.resolve_att_context(options.att_context)
        out = []
        for i, (segment, row) in enumerate(zip(segments, rows, strict=True)):
            result = results.get(i)
            failed = _describe(result, segment) if isinstance(result, Exception) else None
            label = PseudoLabel.of(
                segment,
                None if failed else result,
                model_id=self.engine.model_id,
                att_context=att,
                run_id=self.settings.run_id,
                created_at=now,
                error=failed,
            )
            out.append(label.to_row() | {k: row[k] for k in BOOKKEEPING})
        return out


def _describe(exc: Exception, segment: Segment) -> str:
    if isinstance(exc, ValueError):
        return str(exc)
    return (
        f"transcription failed ({type(exc).__name__}: {exc}); "
        f"the clip is {segment.duration_s} s from {segment.source_uri}"
    )


def rows_of(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A columnar batch (Ray Data's numpy format) as rows of plain Python values."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: plain(batch[k][i]) for k in keys} for i in range(n)]

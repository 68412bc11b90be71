"""Uploaded files: decode, cut at pauses as the batch job does, transcribe the parts in batches
shared across requests, reassemble with absolute times.

Each part is one call of :meth:`FileTranscriber.transcribe_part`, a ``@serve.batch`` method:
parts of every request on this replica that arrive within ``batch_wait_s`` of each other share
a forward pass, up to ``batch_seconds`` of audio (the engine's budget for the device). The model
itself runs on the replica's one model thread (:meth:`asr.scheduler.StreamScheduler.call`),
between the steps of the realtime sessions.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from ray import serve

from asr.audio import SAMPLE_RATE

if TYPE_CHECKING:
    from asr.results import Transcript
    from serve.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Part:
    """A stretch of an uploaded recording on its way to the model."""

    audio: np.ndarray
    offset_s: float
    lang: str
    att_context: tuple[int, int]


def _part_seconds(parts: list[Part]) -> int:
    """A batch's size for Serve: whole audio seconds (a part counts at least one)."""
    return sum(max(1, math.ceil(len(p.audio) / SAMPLE_RATE)) for p in parts)


class FileTranscriber:
    """The file API's work on one replica. Serve's batch queue belongs to the decorated method,
    not to an instance: one :class:`FileTranscriber` per process (a replica has one)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        settings = runtime.settings
        self._budget_s = settings.batch_seconds or runtime.engine.batch_seconds(_default_options())
        # parts are at most 30 s (asr.vad.MAX_SEGMENT_S): a batch always takes one whole part
        self.transcribe_part.set_max_batch_size(int(max(self._budget_s, 31)))  # type: ignore[attr-defined]
        self.transcribe_part.set_batch_wait_timeout_s(settings.batch_wait_s)  # type: ignore[attr-defined]

    @staticmethod
    def decode(data: bytes) -> np.ndarray:
        """16 kHz mono float32 from the bytes of any format FFmpeg reads (:class:`asr.audio.AudioError` if not)."""
        from asr.audio import decode_audio

        return decode_audio(io.BytesIO(data))

    @staticmethod
    def split(audio: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """(offset_s, samples) of each part: the whole clip up to 30 s, else cut at pauses exactly as
        ``earmark transcribe`` cuts it (no speech in a long recording: no parts)."""
        from asr.vad import span_audio, split_long_audio

        return [(start, span_audio(audio, start, end)) for start, end in split_long_audio(audio)]

    async def parts_of(self, data: bytes) -> tuple[float, list[tuple[float, np.ndarray]]]:
        """(duration_s, parts) of an upload; decoding and the VAD run off the event loop."""
        audio = await asyncio.to_thread(self.decode, data)
        parts = await asyncio.to_thread(self.split, audio)
        return len(audio) / SAMPLE_RATE, parts

    async def transcribe(
        self, parts: Sequence[tuple[float, np.ndarray]], *, lang: str, att_context: tuple[int, int]
    ) -> list[Transcript]:
        """Every part's transcript, in order (parts go to the batcher together)."""
        return list(
            await asyncio.gather(*(self._one(Part(audio, offset, lang, att_context)) for offset, audio in parts))
        )

    async def transcribe_in_order(
        self, parts: Sequence[tuple[float, np.ndarray]], *, lang: str, att_context: tuple[int, int]
    ) -> AsyncIterator[tuple[float, Transcript]]:
        """(offset_s, transcript) of each part in order, each as soon as it and those before it are done."""
        tasks = [asyncio.ensure_future(self._one(Part(audio, offset, lang, att_context))) for offset, audio in parts]
        try:
            for (offset, _), task in zip(parts, tasks, strict=True):
                yield offset, await task
        finally:
            for task in tasks:
                task.cancel()

    async def _one(self, part: Part) -> Transcript:
        if self._runtime.settings.batching:
            return await self.transcribe_part(part)
        # the baseline: one model call per part, in arrival order
        (result,) = await asyncio.wrap_future(self._runtime.scheduler.call(lambda: self._run([part])))
        return result

    @serve.batch(max_batch_size=60, batch_wait_timeout_s=0.02, batch_size_fn=_part_seconds)
    async def transcribe_part(self, parts: list[Part]) -> list[Transcript]:
        """One batch of parts (from any requests): one engine call per latency mode, on the model thread."""
        return await asyncio.wrap_future(self._runtime.scheduler.call(lambda: self._run(parts)))

    def _run(self, parts: list[Part]) -> list[Transcript]:
        from asr.engine import TranscribeOptions

        engine = self._runtime.engine
        out: list[Transcript | None] = [None] * len(parts)
        for att in sorted({p.att_context for p in parts}):
            chosen = [i for i, p in enumerate(parts) if p.att_context == att]
            options = TranscribeOptions(att_context=att, batch_seconds=self._budget_s)
            results = engine.transcribe(
                [parts[i].audio for i in chosen], langs=[parts[i].lang for i in chosen], options=options
            )
            for i, result in zip(chosen, results, strict=True):
                out[i] = result
        return [r for r in out if r is not None]


def _default_options():  # noqa: ANN202 - the engine's options, imported lazily
    from asr.engine import TranscribeOptions

    return TranscribeOptions()

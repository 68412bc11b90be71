"""Splitting long recordings at pauses, with Silero VAD (the ``silero-vad`` package ships its model).

>>> spans = plan_segments([(0.5, 9.0), (10.0, 25.0), (27.0, 40.0)], total_s=41.0, max_s=30.0)
>>> [(round(a, 2), round(b, 2)) for a, b in spans]
[(0.3, 25.2), (26.8, 40.2)]

The engine transcribes one segment at a time, so a segment must stay under ``max_s`` (30 s by
default, what the model was trained on). Cuts fall in the middle of the pauses the VAD found,
never inside speech, unless one stretch of speech is itself longer than ``max_s`` (then Silero
cuts it at its longest internal pause, or hard at ``max_s``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
#: Segments never exceed this (seconds).
MAX_SEGMENT_S = 30.0
#: Silence kept around speech at the outer edges of a segment (seconds).
EDGE_PAD_S = 0.2

_model: Any = None
_get_speech_timestamps: Any = None
_model_lock = threading.Lock()


def _silero() -> Any:
    """The Silero VAD model, loaded once per process (JIT, CPU, ~2 MB)."""
    global _model, _get_speech_timestamps
    with _model_lock:
        if _model is None:
            import torch

            threads = torch.get_num_threads()
            # importing silero_vad sets torch's threads to 1 for the whole process: undo that
            from silero_vad import get_speech_timestamps, load_silero_vad

            torch.set_num_threads(threads)
            _model, _get_speech_timestamps = load_silero_vad(), get_speech_timestamps
        return _model


def speech_spans(audio: np.ndarray, *, max_s: float = MAX_SEGMENT_S) -> list[tuple[float, float]]:
    """Stretches of speech in 16 kHz mono ``audio``, in seconds, none longer than ``max_s``."""
    import torch

    model = _silero()
    threads = torch.get_num_threads()
    # Silero runs thousands of tiny 32 ms steps: extra threads only add synchronisation, and on a
    # busy machine they make it hundreds of times slower. One thread, restored afterwards.
    torch.set_num_threads(1)
    with _model_lock, torch.inference_mode():
        try:
            stamps = _get_speech_timestamps(
                torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)),
                model,
                sampling_rate=SAMPLE_RATE,
                max_speech_duration_s=max_s - 2 * EDGE_PAD_S,
                min_silence_duration_ms=150,
                speech_pad_ms=30,
            )
            model.reset_states()
        finally:
            torch.set_num_threads(threads)
    return [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps]


def plan_segments(
    spans: Sequence[tuple[float, float]], *, total_s: float, max_s: float = MAX_SEGMENT_S, pad_s: float = EDGE_PAD_S
) -> list[tuple[float, float]]:
    """Group speech ``spans`` into segments of at most ``max_s``, cut mid-pause.

    Neighbouring spans are merged greedily while the segment stays under ``max_s``; a cut lands
    halfway through the pause between two spans (at most ``pad_s`` from the speech on either
    side when the pause is long, so long silences are left out). No speech -> no segments.
    """
    segments: list[tuple[float, float]] = []
    if not spans:
        return segments
    spans = sorted(spans)
    start = max(0.0, spans[0][0] - pad_s)
    prev_end = spans[0][1]
    for span_start, span_end in spans[1:]:
        gap = span_start - prev_end
        half = max(0.0, min(gap / 2, pad_s))
        if span_end + pad_s - start > max_s:
            cut = prev_end + half
            segments.append((start, min(cut, start + max_s)))
            start = max(span_start - half, cut if gap <= 2 * pad_s else span_start - pad_s)
        prev_end = max(prev_end, span_end)
    segments.append((start, min(total_s, prev_end + pad_s, start + max_s)))
    return segments


def split_long_audio(audio: np.ndarray, *, max_s: float = MAX_SEGMENT_S) -> list[tuple[float, float]]:
    """``(start_s, end_s)`` segments for ``audio``: the whole clip when it fits in ``max_s``."""
    total_s = len(audio) / SAMPLE_RATE
    if total_s <= max_s:
        return [(0.0, total_s)]
    segments = plan_segments(speech_spans(audio, max_s=max_s), total_s=total_s, max_s=max_s)
    return [(round(a, 3), round(b, 3)) for a, b in segments]


def span_audio(audio: np.ndarray, start_s: float, end_s: float) -> np.ndarray:
    """The samples of ``[start_s, end_s)`` of 16 kHz ``audio`` (a segment of :func:`split_long_audio`)."""
    return audio[int(round(start_s * SAMPLE_RATE)) : int(round(end_s * SAMPLE_RATE))]

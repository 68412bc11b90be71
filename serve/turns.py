"""Server-side turn detection for realtime sessions: Silero VAD over the incoming audio.

OpenAI's ``turn_detection: {type: server_vad, threshold, prefix_padding_ms, silence_duration_ms}``:
a turn starts when the VAD hears speech (the item keeps ``prefix_padding_ms`` of audio from
before it) and ends after ``silence_duration_ms`` of silence. Silero's model keeps state between
its 32 ms windows, so each session has a model of its own (~35 ms to load, ~1 ms of one core per
32 ms of audio: a session with ``turn_detection: null`` skips it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from asr.audio import SAMPLE_RATE

WINDOW = 512  # Silero's window at 16 kHz


@dataclass(frozen=True, slots=True)
class TurnConfig:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    @classmethod
    def from_event(cls, value: dict) -> TurnConfig:
        """From OpenAI's ``turn_detection`` object (``type`` must be ``server_vad``); a bad field raises ValueError."""
        kind = value.get("type", "server_vad")
        if kind != "server_vad":
            raise ValueError(f"turn_detection.type {kind!r}: earmark supports 'server_vad' or null (manual commits)")
        out = cls(
            threshold=float(value.get("threshold", DEFAULT.threshold)),
            prefix_padding_ms=int(value.get("prefix_padding_ms", DEFAULT.prefix_padding_ms)),
            silence_duration_ms=int(value.get("silence_duration_ms", DEFAULT.silence_duration_ms)),
        )
        if not 0.0 < out.threshold < 1.0 or out.prefix_padding_ms < 0 or out.silence_duration_ms < 32:
            raise ValueError(
                "turn_detection: threshold must be in (0, 1), prefix_padding_ms >= 0, silence_duration_ms >= 32"
            )
        return out

    def to_event(self) -> dict:
        return {
            "type": "server_vad",
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
        }


DEFAULT = TurnConfig()


@dataclass(frozen=True, slots=True)
class TurnEvent:
    #: ``start`` or ``stop``
    kind: str
    #: Sample index from the start of the session (16 kHz).
    sample: int


class TurnDetector:
    """Feed 16 kHz audio; get turn starts and stops (sample positions from the session's start)."""

    def __init__(self, config: TurnConfig) -> None:
        import torch
        from silero_vad import VADIterator, load_silero_vad

        self.config = config
        self._torch = torch
        self._vad = VADIterator(
            load_silero_vad(),
            threshold=config.threshold,
            sampling_rate=SAMPLE_RATE,
            min_silence_duration_ms=config.silence_duration_ms,
            speech_pad_ms=0,
        )
        self._rest = np.zeros(0, np.float32)
        self.in_speech = False

    def feed(self, pcm: np.ndarray) -> list[TurnEvent]:
        torch = self._torch
        audio = np.concatenate([self._rest, pcm])
        whole = len(audio) // WINDOW * WINDOW
        self._rest = audio[whole:]
        events: list[TurnEvent] = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny steps: more threads only add synchronisation
        try:
            with torch.inference_mode():
                for start in range(0, whole, WINDOW):
                    out = self._vad(torch.from_numpy(audio[start : start + WINDOW]))
                    # the iterator counts every sample since the session began: its positions are absolute
                    if out and "start" in out and not self.in_speech:
                        self.in_speech = True
                        events.append(TurnEvent("start", int(out["start"])))
                    elif out and "end" in out and self.in_speech:
                        self.in_speech = False
                        events.append(TurnEvent("stop", int(out["end"])))
        finally:
            torch.set_num_threads(threads)
        return events


class RecentAudio:
    """The last ``keep_ms`` of a session's audio while no turn is open, so that a turn's item can
    start ``prefix_padding_ms`` before the speech the VAD heard."""

    def __init__(self, keep_ms: int) -> None:
        self._keep = SAMPLE_RATE * keep_ms // 1000
        self._chunks: deque[np.ndarray] = deque()
        self._size = 0
        self._end = 0  # absolute sample after the last pushed one

    def push(self, pcm: np.ndarray, end: int) -> None:
        self._chunks.append(pcm)
        self._size += len(pcm)
        self._end = end
        while self._chunks and self._size - len(self._chunks[0]) >= self._keep:
            self._size -= len(self._chunks.popleft())

    def take_since(self, sample: int) -> tuple[int, np.ndarray]:
        """(absolute start, audio) from ``sample`` (or the oldest kept sample) to the end; empties the buffer."""
        audio = np.concatenate(list(self._chunks)) if self._chunks else np.zeros(0, np.float32)
        start = self._end - len(audio)
        skip = max(0, sample - start)
        self._chunks.clear()
        self._size = 0
        return start + skip, audio[skip:]

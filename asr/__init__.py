"""earmark's ASR engine over NeMo: decode audio, transcribe offline or streaming.

Importing ``asr`` is cheap: torch and NeMo load when a model does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AudioError", "Transcriber", "TranscribeOptions", "Transcript", "decode_audio", "load_model"]

_EXPORTS = {
    "AudioError": "asr.audio",
    "decode_audio": "asr.audio",
    "Transcriber": "asr.engine",
    "TranscribeOptions": "asr.engine",
    "Transcript": "asr.results",
    "load_model": "asr.model",
}

if TYPE_CHECKING:
    from asr.audio import AudioError, decode_audio
    from asr.engine import TranscribeOptions, Transcriber
    from asr.model import load_model
    from asr.results import Transcript


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'asr' has no attribute {name!r}")

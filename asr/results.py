"""What the engine returns: typed, frozen records with plain-data converters.

A :class:`Transcript` is one clip's result. Its ``words`` and ``sentences`` carry times in
seconds from the start of the audio that was passed in, confidences in [0, 1], and the language
the model wrote for each sentence. Language tags never appear in ``text`` or ``words``; they live
in ``text_raw`` (exactly what the model wrote) and in each sentence's ``lang``. Words and
sentences are the records of the pseudo-label table (:mod:`records.pseudo_labels`): a transcript
becomes a row without any field being copied by hand.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from records.pseudo_labels import Sentence, Word

__all__ = ["Sentence", "Transcript", "Word", "detected_language"]


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    text_raw: str
    lang_requested: str
    #: The language of most words, from the per-sentence tags (None when no tag was written).
    lang_detected: str | None
    sentences: tuple[Sentence, ...]
    words: tuple[Word, ...]
    #: Utterance confidence: mean of the word confidences (1.0 for an empty transcript is
    #: wrong, so an empty transcript has the confidence of its blanks: see the engine).
    confidence: float
    duration_s: float
    model_id: str
    att_context: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        """The transcript as plain data (``earmark transcribe-file --json``)."""
        return asdict(self)


def detected_language(sentences: tuple[Sentence, ...] | list[Sentence]) -> str | None:
    """The language with the most words across sentences; ties go to the earliest sentence."""
    counts: Counter[str] = Counter()
    order: dict[str, int] = {}
    for i, s in enumerate(sentences):
        if s.lang is None:
            continue
        counts[s.lang] += max(1, len(s.text.split()))
        order.setdefault(s.lang, i)
    if not counts:
        return None
    return max(counts, key=lambda lang: (counts[lang], -order[lang]))

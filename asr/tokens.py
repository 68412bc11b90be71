"""From decoded tokens (ids, frames, confidences) to words, sentences and a :class:`Transcript`.

Shared by offline and streaming decoding, so both turn the same tokens into the same result.

Why not NeMo's own word timestamps and word confidences: they split words on the text, and a
language-tag token (``<de-DE>``, preceded by a bare ``▁`` piece) then shifts confidences onto the
wrong words (see the notes on NeMo 3.0). Here words are built from SentencePiece pieces: a piece
starting with ``▁`` opens a word, a tag piece closes a sentence and is never a word.

Timing: RNN-T emits a token at the encoder frame where it became sure, so a word's start is the
frame of its first piece and its end the frame after its last piece (80 ms frames on Nemotron).
Confidence: a word's confidence is the minimum over its pieces (a word is as doubtful as its
worst piece); a sentence's and the utterance's are the mean over their words.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asr.results import Sentence, Transcript, Word, detected_language
from records.text import TAG_RE, strip_tags

WORD_START = "▁"


def build_transcript(
    *,
    token_ids: Sequence[int],
    frames: Sequence[int],
    confidences: Sequence[float] | None,
    tokenizer: Any,
    frame_shift_s: float,
    lang_requested: str,
    duration_s: float,
    model_id: str,
    att_context: tuple[int, int],
    time_offset_s: float = 0.0,
    empty_confidence: float = 1.0,
) -> Transcript:
    pieces = tokenizer.ids_to_tokens([int(t) for t in token_ids]) if len(token_ids) else []
    text_raw = tokenizer.ids_to_text([int(t) for t in token_ids]).strip() if len(token_ids) else ""
    confs = list(confidences) if confidences is not None and len(confidences) == len(pieces) else [1.0] * len(pieces)

    words: list[Word] = []
    sentences: list[Sentence] = []
    open_sentence: list[Word] = []
    current: list[tuple[str, int, float]] = []  # pieces of the word being built

    def flush_word() -> None:
        text = "".join(p for p, _, _ in current).replace(WORD_START, " ").strip()
        if text:
            w = Word(
                word=text,
                start_s=round(time_offset_s + current[0][1] * frame_shift_s, 3),
                end_s=round(time_offset_s + (current[-1][1] + 1) * frame_shift_s, 3),
                confidence=round(min(c for _, _, c in current), 4),
            )
            words.append(w)
            open_sentence.append(w)
        current.clear()

    def close_sentence(lang: str | None, lang_conf: float | None) -> None:
        if not open_sentence:
            return
        sentences.append(
            Sentence(
                text=" ".join(w.word for w in open_sentence),
                lang=lang,
                start_s=open_sentence[0].start_s,
                end_s=open_sentence[-1].end_s,
                confidence=round(sum(w.confidence for w in open_sentence) / len(open_sentence), 4),
                lang_confidence=None if lang_conf is None else round(lang_conf, 4),
            )
        )
        open_sentence.clear()

    for piece, frame, conf in zip(pieces, frames, confs, strict=False):
        tag = TAG_RE.fullmatch(piece.replace(WORD_START, ""))
        if tag:
            flush_word()
            close_sentence(tag.group(1), conf)
            continue
        if piece.startswith(WORD_START) and current:
            flush_word()
        current.append((piece, int(frame), float(conf)))
    flush_word()
    close_sentence(None, None)
    if not any(ch.isalnum() for w in words for ch in w.word):
        # Only punctuation (a lone "." on silence): nothing was said. Kept in text_raw, as written.
        words, sentences = [], []

    # With no words, the caller says how sure the model was that nothing was said
    # (the mean confidence of its blank decisions).
    confidence = sum(w.confidence for w in words) / len(words) if words else empty_confidence
    return Transcript(
        text=strip_tags(text_raw) if words else "",
        text_raw=text_raw,
        lang_requested=lang_requested,
        lang_detected=detected_language(sentences),
        sentences=tuple(sentences),
        words=tuple(words),
        confidence=round(confidence, 4),
        duration_s=round(duration_s, 3),
        model_id=model_id,
        att_context=att_context,
    )


def as_list(values: Any) -> list[Any]:
    """A hypothesis field (a tensor, a list of tensors or of numbers, or None) as a list of numbers."""
    if values is None:
        return []
    if hasattr(values, "tolist"):
        return list(values.tolist())
    return [v.item() if hasattr(v, "item") else v for v in values]


def blank_confidence(hyp: Any) -> float:
    """The mean confidence of a hypothesis's frame decisions: how sure the model was that
    nothing was said, for a transcript without words."""
    frames = getattr(hyp, "frame_confidence", None) or []
    values = [
        float(f[0]) if isinstance(f, list | tuple) else float(f)
        for f in frames
        if f is not None and (not isinstance(f, list | tuple) or f)
    ]
    return round(sum(values) / len(values), 4) if values else 1.0

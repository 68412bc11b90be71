"""What people read of a recording: its transcript reassembled from parts, as text, SRT, VTT or JSON.

The one renderer of transcripts: ``earmark transcripts`` writes its files with it and the online
API (``response_format``) answers with it. A long recording is cut at pauses into segments, and
each segment is transcribed on its own with times from its own start; a
:class:`RecordingTranscript` puts them back together with every time **absolute in the source**
(a segment's times shifted by its offset), so a subtitle file plays in step with the file.

* :meth:`RecordingTranscript.from_parts` builds one from ``(offset_s, transcript)`` pairs (an
  ``asr.Transcript`` or a :class:`~records.pseudo_labels.PseudoLabel` is a transcript here);
  :func:`recordings_from_labels` builds one per input item of a batch job's table.
* :func:`to_text`, :func:`to_srt`, :func:`to_vtt`, :func:`to_verbose_json` (OpenAI's
  ``verbose_json``, see ``docs/realtime.md``) and :func:`render` by format name.
* Subtitles: a cue per sentence; a sentence longer than :data:`MAX_CUE_S` or than
  two lines of :data:`MAX_LINE_CHARS` is cut into several cues at word boundaries,
  timed by its words (:func:`subtitle_cues`). Cues never overlap and start strictly in order.

>>> from types import SimpleNamespace as Part
>>> hello = Part(text="Hello there.", lang_detected="en-US", confidence=0.9, duration_s=2.0,
...              sentences=(Sentence("Hello there.", "en-US", 0.2, 1.1, 0.9),),
...              words=(Word("Hello", 0.2, 0.6, 0.9), Word("there.", 0.6, 1.1, 0.9)))
>>> talk = RecordingTranscript.from_parts("/talk.flac", [(0.0, hello), (30.0, hello)])
>>> print(to_srt(talk), end="")
1
00:00:00,200 --> 00:00:01,100
Hello there.
<BLANKLINE>
2
00:00:30,200 --> 00:00:31,100
Hello there.
>>> doc = to_verbose_json(talk)
>>> doc["language"], doc["locale"], doc["duration"], [s["seek"] for s in doc["segments"]]
('english', 'en-US', 32.0, [0, 3000])
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any, Protocol

from records.pseudo_labels import PseudoLabel, Sentence, Word

#: Format name -> file extension: the formats :func:`render` writes (OpenAI's ``response_format``
#: names, and ``txt`` for ``text``).
FORMATS: dict[str, str] = {
    "text": "txt",
    "txt": "txt",
    "srt": "srt",
    "vtt": "vtt",
    "json": "json",
    "verbose_json": "json",
}
#: The longest a subtitle cue stays on screen, in seconds, before its sentence is cut.
MAX_CUE_S = 7.0
#: Characters per subtitle line; a cue has one or two lines (the usual broadcast limits).
MAX_LINE_CHARS = 42

#: ISO-639-1 -> the lower-case English name OpenAI's ``verbose_json`` gives as ``language``
#: (Whisper's names). A language not here is given as its code.
LANGUAGE_NAMES: dict[str, str] = {
    "ar": "arabic", "bg": "bulgarian", "bn": "bengali", "ca": "catalan", "cs": "czech", "cy": "welsh",
    "da": "danish", "de": "german", "el": "greek", "en": "english", "es": "spanish", "et": "estonian",
    "eu": "basque", "fa": "persian", "fi": "finnish", "fr": "french", "gl": "galician", "gu": "gujarati",
    "he": "hebrew", "hi": "hindi", "hr": "croatian", "hu": "hungarian", "hy": "armenian", "id": "indonesian",
    "is": "icelandic", "it": "italian", "ja": "japanese", "ka": "georgian", "kk": "kazakh", "kn": "kannada",
    "ko": "korean", "lt": "lithuanian", "lv": "latvian", "mk": "macedonian", "ml": "malayalam", "mr": "marathi",
    "ms": "malay", "mt": "maltese", "nl": "dutch", "no": "norwegian", "nb": "norwegian", "pa": "punjabi",
    "pl": "polish", "pt": "portuguese", "ro": "romanian", "ru": "russian", "sk": "slovak", "sl": "slovenian",
    "sr": "serbian", "sv": "swedish", "sw": "swahili", "ta": "tamil", "te": "telugu", "th": "thai",
    "tl": "tagalog", "tr": "turkish", "uk": "ukrainian", "ur": "urdu", "vi": "vietnamese", "zh": "chinese",
}  # fmt: skip


class PartLike(Protocol):
    """What a part of a recording gives (``asr.Transcript`` and ``PseudoLabel`` are parts): times
    in seconds from the part's own start."""

    @property
    def text(self) -> str | None: ...
    @property
    def lang_detected(self) -> str | None: ...
    @property
    def sentences(self) -> Sequence[Sentence]: ...
    @property
    def words(self) -> Sequence[Word]: ...
    @property
    def confidence(self) -> float | None: ...
    #: The part's length (None: unknown, it ends with its last word).
    @property
    def duration_s(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class RecordingTranscript:
    """One recording's transcript, its parts put back together; every time is in seconds on the
    source file's timeline (a manifest clip at 60 s of a file starts at 60, not 0)."""

    #: The audio file (local path or ``s3://``).
    source: str
    #: Where the recording starts in the source, and its length: from its first part's start to
    #: its last part's end (silence the VAD left out before the first or after the last segment is
    #: not counted, since the table does not record it; callers that know pass it to ``from_parts``).
    offset_s: float
    duration_s: float
    #: The locale with the most words (ties: the earliest sentence's), as ``lang_detected`` is chosen.
    language: str | None
    #: The parts' texts joined by a space (tags removed).
    text: str
    sentences: tuple[Sentence, ...]
    words: tuple[Word, ...]
    #: The mean word confidence (with no words: the parts' mean; None when nothing was transcribed).
    confidence: float | None
    #: One per sentence: where the part it was transcribed in starts (``verbose_json``'s ``seek``).
    sentence_seek_s: tuple[float, ...]
    #: Parts transcribed (the ok rows of a table).
    parts: int
    #: Why some of the recording is missing: one line per failed (or absent) segment.
    errors: tuple[str, ...] = ()
    #: The batch job's input item (``item_id`` of the table), when it came from one.
    item_id: str | None = None
    model_id: str | None = None

    @property
    def end_s(self) -> float:
        return round(self.offset_s + self.duration_s, 3)

    @classmethod
    def from_parts(
        cls,
        source: str,
        parts: Iterable[tuple[float, PartLike]],
        *,
        offset_s: float | None = None,
        duration_s: float | None = None,
        errors: Sequence[str] = (),
        item_id: str | None = None,
        model_id: str | None = None,
    ) -> RecordingTranscript:
        """The recording of ``source`` put together from ``parts``: ``(offset_s, transcript)``, a
        part starting ``offset_s`` seconds into the source with times from its own start (taken in
        order of offset). ``offset_s`` and ``duration_s`` give the recording's span when the caller
        knows it (default: from the first part's start to the last part's end).

        A time past a part's ``duration_s`` (the model's last frame rounds up) is clipped to it,
        so no part's times run into the next part's."""
        ordered = sorted(parts, key=lambda p: p[0])
        sentences: list[Sentence] = []
        words: list[Word] = []
        seeks: list[float] = []
        texts: list[str] = []
        part_confidences: list[float] = []
        ends: list[float] = []
        for offset, part in ordered:
            length = part.duration_s
            times = [s.end_s for s in part.sentences] + [w.end_s for w in part.words]
            ends.append(offset + (length if length is not None else max(times, default=0.0)))

            def shift(t: float, offset: float = offset, length: float | None = length) -> float:
                return round(offset + max(0.0, t if length is None else min(t, length)), 3)

            sentences += [replace(s, start_s=shift(s.start_s), end_s=shift(s.end_s)) for s in part.sentences]
            words += [replace(w, start_s=shift(w.start_s), end_s=shift(w.end_s)) for w in part.words]
            seeks += [offset] * len(part.sentences)
            if part.text:
                texts.append(part.text)
            if part.confidence is not None:
                part_confidences.append(part.confidence)
        start = offset_s if offset_s is not None else (ordered[0][0] if ordered else 0.0)
        total = duration_s if duration_s is not None else max(ends, default=start) - start
        if words:
            confidence: float | None = round(sum(w.confidence for w in words) / len(words), 4)
        else:
            confidence = round(sum(part_confidences) / len(part_confidences), 4) if part_confidences else None
        language = _most_words(sentences) or next((p.lang_detected for _, p in ordered if p.lang_detected), None)
        return cls(
            source=source,
            offset_s=round(start, 3),
            duration_s=round(max(0.0, total), 3),
            language=language,
            text=" ".join(texts),
            sentences=tuple(sentences),
            words=tuple(words),
            confidence=confidence,
            sentence_seek_s=tuple(seeks),
            parts=len(ordered),
            errors=tuple(errors),
            item_id=item_id,
            model_id=model_id,
        )


def recordings_from_labels(labels: Iterable[PseudoLabel]) -> list[RecordingTranscript]:
    """One transcript per input item of a batch job's table (rows grouped by ``item_id``: a file,
    or a manifest line, so two clips of one file are two recordings), its segments in order;
    sorted by source, then offset.

    Error rows are left out and said: a recording keeps the segments that were transcribed and
    lists the others in ``errors`` (a segment missing from the table too); a recording none of
    whose segments was transcribed has ``parts == 0`` (and nothing to read). Rows of one item
    that disagree (two sources, a segment twice: tables of two runs mixed) raise ``ValueError``."""
    items: dict[str, list[PseudoLabel]] = {}
    for label in labels:
        items.setdefault(label.item_id, []).append(label)
    recordings = [_recording(item_id, rows) for item_id, rows in items.items()]
    return sorted(recordings, key=lambda t: (t.source, t.offset_s, t.item_id or ""))


def _recording(item_id: str, rows: list[PseudoLabel]) -> RecordingTranscript:
    rows = sorted(rows, key=lambda r: (r.segment_index, r.offset_s))
    sources = {r.source_uri for r in rows}
    indices = [r.segment_index for r in rows]
    if len(sources) > 1 or len(set(indices)) < len(indices):
        raise ValueError(
            f"item {item_id}: its rows name {len(sources)} source(s) and segments {indices}; a table holds each "
            "segment once: read the output folder of one job"
        )
    count = max(r.segment_count for r in rows)
    errors = [
        f"segment {r.segment_index + 1} of {r.segment_count} at {r.offset_s:.3f} s: {r.error or 'failed'}"
        if r.segment_count > 1
        else (r.error or "failed")
        for r in rows
        if not r.ok
    ]
    errors += [f"segment {k + 1} of {count}: not in the table" for k in sorted(set(range(count)) - set(indices))]
    start = min(r.offset_s for r in rows)
    end = max((r.offset_s + r.duration_s for r in rows if r.duration_s is not None), default=start)
    ok = [r for r in rows if r.ok]
    return RecordingTranscript.from_parts(
        rows[0].source_uri,
        [(r.offset_s, r) for r in ok],
        offset_s=start,
        duration_s=end - start,
        errors=errors,
        item_id=item_id,
        model_id=next((r.model_id for r in ok if r.model_id), None),
    )


def _most_words(sentences: Sequence[Sentence]) -> str | None:
    """The locale with the most words; ties go to the earliest sentence (``asr.results``' rule)."""
    counts: Counter[str] = Counter()
    order: dict[str, int] = {}
    for i, s in enumerate(sentences):
        if s.lang is not None:
            counts[s.lang] += max(1, len(s.text.split()))
            order.setdefault(s.lang, i)
    return max(counts, key=lambda lang: (counts[lang], -order[lang])) if counts else None


def language_name(locale: str | None) -> str | None:
    """OpenAI's name of ``locale``'s language (``de-DE`` -> ``german``); the code when unknown."""
    if not locale:
        return None
    code = locale.split("-")[0].lower()
    return LANGUAGE_NAMES.get(code, code)


def file_names(recordings: Sequence[RecordingTranscript], fmt: str) -> list[str]:
    """A file name for each recording, in order: the source's basename with ``fmt``'s extension;
    names two recordings share get the recording's item id's first 8 digits (``talk-1a2b3c4d.srt``),
    so the same table always gives the same names."""
    ext = _extension(fmt)
    stems = [PurePosixPath(t.source.rstrip("/")).stem or "recording" for t in recordings]
    clashes = {s for s, n in Counter(stems).items() if n > 1}
    names = [
        f"{stem}-{(t.item_id or _source_hash(t))[:8]}.{ext}" if stem in clashes else f"{stem}.{ext}"
        for stem, t in zip(stems, recordings, strict=True)
    ]
    if len(set(names)) < len(names):  # ids that share 8 digits: the whole id
        names = [
            f"{stem}-{t.item_id or _source_hash(t)}-{k}.{ext}" if stem in clashes else name
            for k, (stem, t, name) in enumerate(zip(stems, recordings, names, strict=True))
        ]
    return names


def _source_hash(t: RecordingTranscript) -> str:
    import hashlib

    return hashlib.blake2b(f"{t.source}|{t.offset_s:.3f}".encode(), digest_size=8).hexdigest()


# --- renderers ---------------------------------------------------------------------------------


def render(t: RecordingTranscript, fmt: str) -> str:
    """The document of ``t`` in ``fmt`` (a name of :data:`FORMATS`)."""
    _extension(fmt)
    if fmt in ("text", "txt"):
        return to_text(t)
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    return json.dumps(to_verbose_json(t), ensure_ascii=False, indent=2) + "\n"


def _extension(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown transcript format {fmt!r}; the formats: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def to_text(t: RecordingTranscript) -> str:
    """The text, on one line (empty when nothing was said)."""
    return f"{t.text}\n" if t.text else ""


def to_srt(t: RecordingTranscript) -> str:
    """SubRip: numbered cues, ``HH:MM:SS,mmm`` times."""
    blocks = [
        "\n".join([str(k), f"{_clock(c.start_ms, ',')} --> {_clock(c.end_ms, ',')}", *c.lines])
        for k, c in enumerate(subtitle_cues(t), start=1)
    ]
    return "\n\n".join(blocks) + "\n" if blocks else ""


def to_vtt(t: RecordingTranscript) -> str:
    """WebVTT: the header, then cues with ``HH:MM:SS.mmm`` times (``&``, ``<``, ``>`` escaped)."""
    blocks = [
        "\n".join([f"{_clock(c.start_ms, '.')} --> {_clock(c.end_ms, '.')}", *map(_vtt_escape, c.lines)])
        for c in subtitle_cues(t)
    ]
    return "WEBVTT\n\n" + "\n\n".join(blocks) + "\n" if blocks else "WEBVTT\n"


def to_verbose_json(t: RecordingTranscript) -> dict[str, Any]:
    """OpenAI's ``verbose_json`` (``docs/realtime.md``): one segment per sentence, Whisper's fields
    filled honestly for an RNN-T model, plus earmark's ``locale`` and ``confidence``. ``usage``
    is the recording's seconds, ``model`` the checkpoint (None when unknown)."""
    segments: list[dict[str, Any]] = [
        {
            "id": k,
            "seek": round(seek * 100),  # 10 ms frames from the source's start to the part's
            "start": s.start_s,
            "end": s.end_s,
            "text": s.text,
            "tokens": [],  # the model's pieces are not exposed
            "temperature": 0.0,  # greedy decoding
            "avg_logprob": None,  # an RNN-T transducer has no such figure
            "compression_ratio": _compression_ratio(s.text),
            "no_speech_prob": None,
            "locale": s.lang,
            "confidence": s.confidence,
        }
        for k, (s, seek) in enumerate(zip(t.sentences, t.sentence_seek_s, strict=True))
    ]
    return {
        "task": "transcribe",
        "language": language_name(t.language),
        "locale": t.language,
        "duration": t.duration_s,
        "text": t.text,
        "segments": segments,
        "words": [{"word": w.word, "start": w.start_s, "end": w.end_s, "confidence": w.confidence} for w in t.words],
        "usage": {"type": "duration", "seconds": t.duration_s},
        "model": t.model_id,
    }


def _compression_ratio(text: str) -> float:
    """Whisper's figure: the text's UTF-8 bytes over their zlib-compressed bytes."""
    data = text.encode()
    return round(len(data) / len(zlib.compress(data)), 4)


# --- subtitle cues -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cue:
    """A subtitle on screen: from ``start_ms`` to ``end_ms`` (milliseconds on the source's
    timeline), one or two lines."""

    start_ms: int
    end_ms: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)


def subtitle_cues(t: RecordingTranscript) -> list[Cue]:
    """The cues of ``t``: one per sentence, or several for a sentence that would stay on screen
    longer than :data:`MAX_CUE_S` or not fit in two lines of :data:`MAX_LINE_CHARS`
    (cut at words, as few cues as fit, as even as can be). A cue starts no earlier than the one
    before it ends and lasts at least a millisecond; the cues' texts joined are the sentences'."""
    cues: list[Cue] = []
    previous_end = round(t.offset_s * 1000)
    last_ms = round(t.end_s * 1000)
    for tokens in _sentence_tokens(t):
        for group in _groups(tokens):
            start = max(round(group[0].start_s * 1000), previous_end)
            end = max(round(group[-1].end_s * 1000), start + 1)
            if end > last_ms > start:
                end = last_ms
            cues.append(Cue(start, end, _lines([w.word for w in group])))
            previous_end = end
    return cues


def _sentence_tokens(t: RecordingTranscript) -> Iterable[list[Word]]:
    """Each sentence's words, in order. The words are the sentence's when they spell its text (the
    engine builds sentences from words); otherwise the sentence's own words are spread over its
    span by their lengths, so the cues always say what the sentence says."""
    cursor = 0
    for s in t.sentences:
        tokens = s.text.split()
        if not tokens:
            continue
        own = t.words[cursor : cursor + len(tokens)]
        if [w.word for w in own] == tokens:
            cursor += len(tokens)
            yield list(own)
            continue
        while cursor < len(t.words) and t.words[cursor].start_s < s.end_s:
            cursor += 1
        yield _spread(tokens, s)


def _spread(tokens: list[str], s: Sentence) -> list[Word]:
    total = sum(len(w) + 1 for w in tokens)
    span = max(0.0, s.end_s - s.start_s)
    out, used = [], 0
    for w in tokens:
        start = s.start_s + span * used / total
        used += len(w) + 1
        out.append(Word(w, round(start, 3), round(s.start_s + span * used / total, 3), s.confidence))
    return out


def _groups(words: list[Word]) -> list[list[Word]]:
    """``words`` cut into the fewest groups that fit a cue, the most even by length: a shortest
    path over cut points weighted (1 cue, its characters squared), compared in that order."""
    n = len(words)
    best: list[tuple[int, int, int]] = [(0, 0, -1)] + [(n + 1, 0, -1)] * n  # (cues, sum of chars², cut)
    for i in range(1, n + 1):
        for j in range(i - 1, -1, -1):
            if j < i - 1 and not _fits(words[j:i]):
                break  # a longer group (earlier j) fits even less
            chars = len(" ".join(w.word for w in words[j:i]))
            cost = (best[j][0] + 1, best[j][1] + chars * chars, j)
            if cost[:2] < best[i][:2]:
                best[i] = cost
    cuts = []
    i = n
    while i > 0:
        cuts.append(i)
        i = best[i][2]
    bounds = [0, *reversed(cuts)]
    return [words[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _fits(group: Sequence[Word]) -> bool:
    return group[-1].end_s - group[0].start_s <= MAX_CUE_S and _wrap([w.word for w in group]) is not None


def _wrap(words: list[str]) -> tuple[str, ...] | None:
    """``words`` on one line, or on two lines as even as can be; None when two lines cannot hold them."""
    text = " ".join(words)
    if len(text) <= MAX_LINE_CHARS:
        return (text,)
    options = [(" ".join(words[:k]), " ".join(words[k:])) for k in range(1, len(words))]
    fitting = [o for o in options if max(map(len, o)) <= MAX_LINE_CHARS]
    return min(fitting, key=lambda o: abs(len(o[0]) - len(o[1]))) if fitting else None


def _lines(words: list[str]) -> tuple[str, ...]:
    wrapped = _wrap(words)
    if wrapped is not None:
        return wrapped
    return (" ".join(words),)  # one word too long for a line: it stays whole


def _clock(ms: int, separator: str) -> str:
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{separator}{millis:03d}"


def _vtt_escape(line: str) -> str:
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

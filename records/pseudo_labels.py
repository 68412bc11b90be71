"""The pseudo-label table: what ``earmark transcribe`` writes and ``earmark route`` reads.

One row per clip, ``ok`` or ``error``, in Parquet files that DuckDB, pandas and ``datasets``
read as they are. This module is the table's one definition: the records (:class:`Word`,
:class:`Sentence`; :class:`Clip`, whose fields a :class:`Segment` on its way to the model and a
:class:`PseudoLabel` share), the Arrow :data:`SCHEMA` with each column's meaning, and the
converters between records, rows (plain dicts, as pyarrow gives them) and tables. ``docs/pseudo-labels.md`` holds the table :func:`markdown_table` prints (a
test checks that it does). The schema's version is stored in each file's metadata
(``earmark.schema_version``).

>>> label = PseudoLabel.from_row(row)                                       # doctest: +SKIP
>>> [w.word for w in label.words if w.confidence < 0.5]                      # doctest: +SKIP
>>> to_table([label]).num_rows                                              # doctest: +SKIP
1
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from records.clips import clip_id

SCHEMA_VERSION = "1"
STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass(frozen=True, slots=True)
class Word:
    word: str
    #: Seconds from the start of the clip.
    start_s: float
    end_s: float
    #: In [0, 1].
    confidence: float

    def to_row(self) -> dict[str, Any]:
        return {"word": self.word, "start_s": self.start_s, "end_s": self.end_s, "confidence": self.confidence}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Word:
        return cls(row["word"], row["start_s"], row["end_s"], row["confidence"])


@dataclass(frozen=True, slots=True)
class Sentence:
    text: str
    #: The locale the model tagged this sentence with (``None`` when it wrote no tag).
    lang: str | None
    start_s: float
    end_s: float
    confidence: float
    #: The model's confidence in the language tag token itself (not stored in the table).
    lang_confidence: float | None = None

    def to_row(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "lang": self.lang,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "confidence": self.confidence,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Sentence:
        return cls(row["text"], row["lang"], row["start_s"], row["end_s"], row["confidence"])


class TranscriptLike(Protocol):
    """What a pseudo-label takes from a transcript (``asr.Transcript`` is one)."""

    @property
    def text(self) -> str: ...
    @property
    def text_raw(self) -> str: ...
    @property
    def lang_requested(self) -> str: ...
    @property
    def lang_detected(self) -> str | None: ...
    @property
    def sentences(self) -> Sequence[Sentence]: ...
    @property
    def words(self) -> Sequence[Word]: ...
    @property
    def confidence(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Clip:
    """What every row knows of its clip: its identity, where its audio is, what was asked of the
    model, and why it failed (None: it did not)."""

    clip_id: str
    item_id: str
    source_uri: str
    source_hash: str | None
    offset_s: float
    duration_s: float | None
    segment_index: int
    segment_count: int
    lang_requested: str | None
    ref_text: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Segment(Clip):
    """A clip on its way to the model. A batch job's input line becomes one segment, or several
    when a long recording is cut at pauses; :meth:`PseudoLabel.of` turns a segment and its
    transcript into the row."""

    def with_error(self, error: str) -> Segment:
        return replace(self, error=error)

    def with_source_hash(self, source_hash: str) -> Segment:
        return replace(self, source_hash=source_hash)

    def with_duration(self, duration_s: float) -> Segment:
        """The same clip (same id) with its length as decoded."""
        return replace(self, duration_s=duration_s)

    def with_span(self, start_s: float, duration_s: float, index: int, count: int) -> Segment:
        """The part ``[start_s, start_s + duration_s)`` of this clip, segment ``index`` of ``count``:
        a clip of its own, with its own id (times to the millisecond)."""
        offset, duration = round(self.offset_s + start_s, 3), round(duration_s, 3)
        return replace(
            self,
            clip_id=clip_id(self.source_uri, offset, duration),
            offset_s=offset,
            duration_s=duration,
            segment_index=index,
            segment_count=count,
        )

    def to_row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _CLIP_FIELDS}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Segment:
        return cls(**{name: plain(row[name]) for name in _CLIP_FIELDS})


_CLIP_FIELDS = tuple(f.name for f in fields(Clip))


@dataclass(frozen=True, slots=True)
class PseudoLabel(Clip):
    """One row of the table: a clip and what the model made of it (see :data:`SCHEMA` for what
    each field means)."""

    status: str
    text: str | None
    text_raw: str | None
    lang_detected: str | None
    sentences: tuple[Sentence, ...]
    words: tuple[Word, ...]
    confidence: float | None
    model_id: str | None
    att_context: tuple[int, int] | None
    run_id: str
    created_at: dt.datetime

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def sentence_langs(self) -> list[str | None]:
        return [s.lang for s in self.sentences]

    @classmethod
    def of(
        cls,
        segment: Segment,
        transcript: TranscriptLike | None,
        *,
        model_id: str | None,
        att_context: tuple[int, int] | None,
        run_id: str,
        created_at: dt.datetime,
        error: str | None = None,
    ) -> PseudoLabel:
        """The row of ``segment``: its transcript (None for a segment with no speech, which gets an
        empty text), or an error row when the segment or ``error`` says it failed."""
        reason = error or segment.error
        label = cls(
            **{name: getattr(segment, name) for name in _CLIP_FIELDS if name != "error"},
            error=reason,
            status=STATUS_OK if reason is None else STATUS_ERROR,
            text=None if reason else "",
            text_raw=None if reason else "",
            lang_detected=None,
            sentences=(),
            words=(),
            confidence=None,
            model_id=model_id,
            att_context=att_context,
            run_id=run_id,
            created_at=created_at,
        )
        if reason is not None or transcript is None:
            return label
        return replace(
            label,
            text=transcript.text,
            text_raw=transcript.text_raw,
            lang_requested=transcript.lang_requested,
            lang_detected=transcript.lang_detected,
            sentences=tuple(transcript.sentences),
            words=tuple(transcript.words),
            confidence=transcript.confidence,
        )

    def to_row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in COLUMNS}
        row["sentences"] = [s.to_row() for s in self.sentences]
        row["words"] = [w.to_row() for w in self.words]
        row["att_context"] = None if self.att_context is None else list(self.att_context)
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PseudoLabel:
        """A record from a row with every column (as ``Table.to_pylist()`` gives them)."""
        values = {name: plain(row[name]) for name in COLUMNS}
        values["sentences"] = tuple(Sentence.from_row(s) for s in row["sentences"] or ())
        values["words"] = tuple(Word.from_row(w) for w in row["words"] or ())
        att = row["att_context"]
        values["att_context"] = None if att is None else (int(att[0]), int(att[1]))
        return cls(**values)


def _column(name: str, type_: pa.DataType, doc: str, *, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


WORD = pa.struct(
    [("word", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()), ("confidence", pa.float64())]
)
SENTENCE = pa.struct(
    [
        ("text", pa.string()),
        ("lang", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("confidence", pa.float64()),
    ]
)

SCHEMA = pa.schema(
    [
        _column(
            "clip_id",
            pa.string(),
            "`blake2b(source_uri, offset_s, duration_s)`, 16 hex digits (`records.clips.clip_id`). The same input "
            "gives the same ids on every run. A clip that was not split keeps the id of the input line (with "
            '`duration` "end" when the line gave none); a segment\'s id comes from its own offset and duration.',
            nullable=False,
        ),
        _column(
            "item_id",
            pa.string(),
            "id of the input line (file or manifest entry) the row came from; equal to `clip_id` when the clip was "
            "not split",
            nullable=False,
        ),
        _column(
            "source_uri",
            pa.string(),
            "the audio file: absolute local path or `s3://bucket/key` (relative manifest paths are resolved against "
            "the manifest's folder, as NeMo does)",
            nullable=False,
        ),
        _column("source_hash", pa.string(), "SHA-256 of the source file's bytes (null when it could not be read)"),
        _column("offset_s", pa.float64(), "where the clip starts in the source, in seconds", nullable=False),
        _column(
            "duration_s",
            pa.float64(),
            "the clip's length in seconds as decoded (null for an error row whose input gave none)",
        ),
        _column(
            "segment_index",
            pa.int32(),
            "position of this segment among the segments of its input line (0 when not split)",
            nullable=False,
        ),
        _column("segment_count", pa.int32(), "segments of its input line (1 when not split)", nullable=False),
        _column("status", pa.string(), "`ok` or `error`", nullable=False),
        _column("error", pa.string(), "why the clip failed (decoder, storage or model message); null when `ok`"),
        _column("text", pa.string(), 'the transcript without language tags; `""` when nothing was recognised'),
        _column(
            "text_raw", pa.string(), "exactly what the model wrote, tags included (`Hola. <es-ES> Hello. <en-US>`)"
        ),
        _column("lang_requested", pa.string(), "`auto` or the locale the model was prompted with"),
        _column("lang_detected", pa.string(), "the language of most words, from the per-sentence tags"),
        _column(
            "sentences",
            pa.list_(SENTENCE),
            "one entry per sentence with the language the model tagged it with",
        ),
        _column(
            "words",
            pa.list_(WORD),
            "words with times in seconds **from the clip's start** (add `offset_s` for the source's timeline) and "
            "confidence in [0, 1]",
        ),
        _column(
            "confidence",
            pa.float64(),
            "utterance confidence: the mean of the word confidences (Tsallis entropy, alpha 1/3, exp normalisation, "
            "blanks excluded; see `asr/loaded.py`)",
        ),
        _column(
            "ref_text",
            pa.string(),
            "the `text` of the manifest line, when it had one (kept for evaluation; never used to decode)",
        ),
        _column("model_id", pa.string(), "`name@sha256-prefix` of the checkpoint"),
        _column("att_context", pa.list_(pa.int32()), "the latency mode `[left, right]`"),
        _column(
            "run_id",
            pa.string(),
            "the job that wrote the row (kept across resumes of the same job)",
            nullable=False,
        ),
        _column("created_at", pa.timestamp("us", tz="UTC"), "when the row was produced", nullable=False),
    ],
    metadata={"earmark.schema_version": SCHEMA_VERSION, "earmark.table": "pseudo_labels"},
)

COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
if sorted(COLUMNS) != sorted(f.name for f in fields(PseudoLabel)):  # the record and the schema are one definition
    raise AssertionError("PseudoLabel's fields and SCHEMA's columns differ")


class _Columns:
    """Column names for columnar work on a table: ``table.column(COL.status)``. A name that is not
    a column of :data:`SCHEMA` raises at once."""

    __slots__ = ()

    def __getattr__(self, name: str) -> str:
        if name not in COLUMNS:
            raise AttributeError(f"the pseudo-label table has no column {name!r}; its columns: {', '.join(COLUMNS)}")
        return name


COL = _Columns()


def to_table(labels: Iterable[PseudoLabel], schema: pa.Schema = SCHEMA) -> pa.Table:
    """Records as a table of :data:`SCHEMA` (or of a schema that extends it)."""
    return pa.Table.from_pylist([label.to_row() for label in labels], schema=schema)


def from_table(table: pa.Table) -> list[PseudoLabel]:
    """The records of a table that has every column of :data:`SCHEMA` (more are ignored).

    Column by column rather than row by row (``to_pylist`` and :meth:`PseudoLabel.from_row`):
    ``earmark route`` reads a million rows twice, and this is 3x faster."""
    columns = {name: table.column(name) for name in COLUMNS}
    values: dict[str, list[Any]] = {name: column.to_pylist() for name, column in columns.items() if name not in _NESTED}
    values["words"] = _nested(columns["words"], Word)
    values["sentences"] = _nested(columns["sentences"], Sentence)
    values["att_context"] = [None if a is None else (a[0], a[1]) for a in columns["att_context"].to_pylist()]
    values["confidence"] = [None if c is None or c != c else c for c in values["confidence"]]  # NaN: none
    return [PseudoLabel(*row) for row in zip(*(values[name] for name in _FIELDS), strict=True)]


_NESTED = ("words", "sentences", "att_context")
_FIELDS = tuple(f.name for f in fields(PseudoLabel))  # the record's order: its clip's fields, then the result's


def _nested(column: pa.ChunkedArray, record: type[Word] | type[Sentence]) -> list[tuple[Any, ...]]:
    """A ``list<struct>`` column as one tuple of records per row (an empty tuple for null)."""
    out: list[tuple[Any, ...]] = []
    for chunk in column.chunks:
        lengths = chunk.value_lengths().fill_null(0).to_pylist()
        flat = chunk.flatten()  # the values of the valid lists, in order
        fields_ = [flat.field(i).to_pylist() for i in range(flat.type.num_fields)]
        items = list(map(record, *fields_))
        start = 0
        for n in lengths:
            out.append(tuple(items[start : start + n]))
            start += n
    return out


def conform(table: pa.Table) -> pa.Table:
    """``table``'s columns of :data:`SCHEMA`, in its order and types (bookkeeping columns dropped)."""
    return table.select(list(COLUMNS)).cast(SCHEMA)


def plain(value: Any) -> Any:
    """numpy scalars -> Python values, NaN -> None (Arrow round-trips through numpy give both)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def markdown_table() -> str:
    """The column table of ``docs/pseudo-labels.md``, from :data:`SCHEMA`."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for f in SCHEMA:
        kind = _type_name(f.type) + (", null" if f.nullable else "")
        lines.append(f"| `{f.name}` | {kind} | {f.metadata[b'doc'].decode()} |")
    return "\n".join(lines) + "\n"


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        inner = t.value_type
        if pa.types.is_struct(inner):
            return "list<struct<" + ", ".join(inner.field(i).name for i in range(inner.num_fields)) + ">>"
        return f"list<{_type_name(inner)}>"
    if pa.types.is_timestamp(t):
        return "timestamp (UTC)"
    return {"string": "string", "double": "double", "int32": "int32"}.get(str(t), str(t))


if __name__ == "__main__":  # python -m records.pseudo_labels > table.md: the docs' table
    print(markdown_table(), end="")

"""The pseudo-label table: what ``earmark transcribe`` writes and ``earmark route`` reads.

One row per clip, ``ok`` or ``error``, in Parquet files that DuckDB, pandas and ``datasets``
read as they are. The columns are documented in ``docs/pseudo-labels.md``; this module is the
schema's single source, and its version is stored in each file's metadata
(``earmark.schema_version``).

>>> import pyarrow.parquet as pq                                            # doctest: +SKIP
>>> pq.read_table("labels/", columns=["clip_id", "text", "confidence"])    # doctest: +SKIP
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"
STATUS_OK = "ok"
STATUS_ERROR = "error"

WORD = pa.struct(
    [
        ("word", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("confidence", pa.float64()),
    ]
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
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_hash", pa.string()),
        pa.field("offset_s", pa.float64(), nullable=False),
        pa.field("duration_s", pa.float64()),
        pa.field("segment_index", pa.int32(), nullable=False),
        pa.field("segment_count", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("text", pa.string()),
        pa.field("text_raw", pa.string()),
        pa.field("lang_requested", pa.string()),
        pa.field("lang_detected", pa.string()),
        pa.field("sentences", pa.list_(SENTENCE)),
        pa.field("words", pa.list_(WORD)),
        pa.field("confidence", pa.float64()),
        pa.field("ref_text", pa.string()),
        pa.field("model_id", pa.string()),
        pa.field("att_context", pa.list_(pa.int32())),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"earmark.schema_version": SCHEMA_VERSION, "earmark.table": "pseudo_labels"},
)

COLUMNS = tuple(SCHEMA.names)


def to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with every column of :data:`SCHEMA`) as a table; raises on a missing column."""
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"pseudo-label rows lack columns {missing}; build them with the job's row converters")
    return pa.Table.from_pylist(rows, schema=SCHEMA)

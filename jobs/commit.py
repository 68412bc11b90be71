"""Exactly-once output: shard-sized Parquet parts, each written once and atomically.

The output folder of a batch job::

    OUT/part-000000.parquet ...    one per shard of the plan, written when the shard is complete
    OUT/_earmark/run.json          the job's settings and plan (checked on every rerun)
    OUT/_earmark/inputs.jsonl      the listing, when the input was a folder, glob or prefix
    OUT/_earmark/summary.json      written when every shard is in
    OUT/_SUCCESS                   written last

A part exists only once its shard is complete (a local file is renamed into place; an S3 PUT
is atomic), so after a crash the parts on disk are exactly the finished shards: a rerun redoes
the others and nothing else. Inside a shard, rows are keyed by ``clip_id``: a batch that Ray
retried after a worker died cannot add a row twice. Readers skip names starting with ``_``, so
``pandas.read_parquet(OUT)`` and ``duckdb``'s ``read_parquet('OUT/*.parquet')`` see only parts.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster import storage
from cluster.storage import StorageOptions
from records.pseudo_labels import COL, SCHEMA, conform

PART_RE = re.compile(r"part-(\d{6})\.parquet$")
META_DIR = "_earmark"


def join(uri: str, *names: str) -> str:
    return "/".join([uri.rstrip("/"), *names])


def done_shards(out: str, options: StorageOptions | None = None) -> set[int]:
    """Indices of the shards whose part is in ``out`` (what a rerun skips)."""
    import pyarrow.fs as pafs

    fs, path = storage.pyarrow_filesystem(out, options)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    infos = storage.pyarrow_call(out, lambda: fs.get_file_info(selector))
    return {int(m.group(1)) for info in infos if (m := PART_RE.search(info.path))}


@dataclass
class _Pending:
    size: int
    tables: list[pa.Table] = field(default_factory=list)
    segments: dict[int, tuple[int, set[int]]] = field(default_factory=dict)

    def complete(self) -> bool:
        return len(self.segments) == self.size and all(len(s) == n for n, s in self.segments.values())


class ShardCommitter:
    """Collects result rows by shard and writes each shard's part once it is complete."""

    def __init__(self, out: str, *, options: StorageOptions | None = None) -> None:
        self.out = out
        self.options = options
        self.fs, self.root = storage.pyarrow_filesystem(out, options)
        self.local = not storage.is_remote(out)
        self.pending: dict[int, _Pending] = {}
        self.committed: set[int] = set()

    def add(self, table: pa.Table) -> list[pa.Table]:
        """Take a batch of result rows; return the parts this batch completed (already written)."""
        written = []
        shards = table.column("shard").to_pylist()
        sizes = table.column("shard_items").to_pylist()
        items = table.column("item_index").to_pylist()
        segs = table.column(COL.segment_index).to_pylist()
        counts = table.column(COL.segment_count).to_pylist()
        touched: dict[int, list[int]] = {}
        for row, (shard, size, item, seg, count) in enumerate(zip(shards, sizes, items, segs, counts, strict=True)):
            if shard in self.committed:
                continue  # a retried batch of a shard already written
            pending = self.pending.setdefault(shard, _Pending(size))
            pending.segments.setdefault(item, (count, set()))[1].add(seg)
            touched.setdefault(shard, []).append(row)
        for shard, rows in touched.items():
            pending = self.pending[shard]
            pending.tables.append(table.take(pa.array(rows)))
            if pending.complete():
                written.append(self._write(shard, pa.concat_tables(pending.tables)))
                del self.pending[shard]
                self.committed.add(shard)
        return written

    def write_empty(self, shard: int) -> None:
        """A shard whose byte range held no manifest line still gets its (empty) part."""
        self._write(shard, SCHEMA.empty_table())
        self.committed.add(shard)

    def _write(self, shard: int, table: pa.Table) -> pa.Table:
        if table.num_rows:
            table = _dedupe(table).sort_by([("item_index", "ascending"), (COL.segment_index, "ascending")])
        table = conform(table)
        final = f"{self.root}/part-{shard:06d}.parquet"
        if self.local:
            tmp_dir = f"{self.root}/{META_DIR}/tmp"
            self.fs.create_dir(tmp_dir, recursive=True)
            tmp = f"{tmp_dir}/part-{shard:06d}.{uuid.uuid4().hex}.parquet"
            pq.write_table(table, tmp, filesystem=self.fs)
            self.fs.move(tmp, final)  # rename(2): atomic on one filesystem
        else:
            # an S3 object appears whole or not at all, so a write retried after an outage
            # cannot leave half a part behind
            uri = join(self.out, f"part-{shard:06d}.parquet")
            storage.pyarrow_call(uri, lambda: pq.write_table(table, final, filesystem=self.fs))
        return table


def _dedupe(table: pa.Table) -> pa.Table:
    ids = table.column(COL.clip_id)
    if pc.count_distinct(ids).as_py() == table.num_rows:
        return table
    first: dict[str, int] = {}
    for i, cid in enumerate(ids.to_pylist()):
        first.setdefault(cid, i)
    return table.take(pa.array(sorted(first.values())))

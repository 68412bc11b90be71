"""What a batch job is asked to transcribe: inputs and the plan in shards.

Every input (a folder, a glob, an ``s3://`` prefix or a NeMo manifest) becomes a NeMo JSON-lines
manifest: a manifest is used as it is; a listing is streamed into ``<out>/_earmark/inputs.jsonl``
once and reused by every rerun. Clip identity and the manifest's lines are the contracts of
:mod:`records.clips` and :mod:`records.manifest`. The manifest is then cut into **shards**: byte ranges of the
file, each holding the lines that start inside it. A shard is the unit of work and of commit:
its results land in one Parquet file, written atomically, so a shard is either done or not.

Neither the listing nor the manifest is ever held in memory: the driver streams the listing to
disk and plans shards from the file size alone; workers read their own byte range.
"""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster import storage
from records.clips import ClipRef
from records.manifest import ManifestEntry, ManifestError, count_entries, manifest_base, parse_line, to_line

#: What a listing keeps (case-insensitive).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aac", ".mp4", ".mkv", ".webm", ".wma", ".aiff")


class InputError(ValueError):
    """The input cannot be planned (missing, empty, unreadable manifest line...)."""

    #: For a bad manifest line: the byte offset where it starts.
    byte: int | None = None


@dataclass(frozen=True, slots=True)
class Shard:
    """Lines of ``manifest`` that start in bytes ``[start, end)``."""

    index: int
    manifest: str
    start: int
    end: int
    #: Size of the whole manifest (a line may run past ``end``, never past this).
    total: int

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}"


def iter_listing(source: str, options: storage.StorageOptions | None = None) -> Iterator[str]:
    """Audio files under a folder, an ``s3://`` prefix or matching a glob, in sorted order."""
    if storage.is_remote(source):
        if any(ch in source for ch in "*?["):
            base = source.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0].rsplit("/", 1)[0]
            return (u for u in storage.list_files(base, options, suffixes=AUDIO_SUFFIXES) if fnmatch.fnmatch(u, source))
        return storage.list_files(source, options, suffixes=AUDIO_SUFFIXES)
    if any(ch in source for ch in "*?["):
        return (p for p in sorted(glob.iglob(source, recursive=True)) if p.lower().endswith(AUDIO_SUFFIXES))
    if Path(source).is_file():
        return iter([str(Path(source).resolve())])
    return (str(Path(p).resolve()) for p in storage.list_files(source, suffixes=AUDIO_SUFFIXES))


def write_listing(source: str, manifest_uri: str, options: storage.StorageOptions | None = None) -> int:
    """Stream the listing of ``source`` into the manifest ``manifest_uri``; returns the count.
    An outage of the store redoes the listing (after retrying for the budget)."""
    tmp = manifest_uri + ".part"
    fs, path = storage.pyarrow_filesystem(tmp, options)
    _, final = storage.pyarrow_filesystem(manifest_uri, options)

    def write() -> int:
        count = 0
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            for uri in iter_listing(source, options):
                out.write((to_line(ManifestEntry(uri)) + "\n").encode())
                count += 1
        if count == 0:
            fs.delete_file(path)
            raise InputError(f"{source}: no audio files found (looked for {', '.join(AUDIO_SUFFIXES)}); check the path")
        fs.move(path, final)
        return count

    return storage.pyarrow_call(manifest_uri, write)


def plan_shards(manifest_uri: str, *, shard_bytes: int, options: storage.StorageOptions | None = None) -> list[Shard]:
    """Byte-range shards of a manifest; deterministic for a given file and ``shard_bytes``."""
    total = storage.size(manifest_uri, options)
    if total == 0:
        raise InputError(f"{manifest_uri}: the manifest is empty; give it one JSON object per line")
    return [
        Shard(i, manifest_uri, start, min(start + shard_bytes, total), total)
        for i, start in enumerate(range(0, total, shard_bytes))
    ]


def estimate_shard_bytes(
    manifest_uri: str, *, lines_per_shard: int, options: storage.StorageOptions | None = None
) -> int:
    """Bytes that hold about ``lines_per_shard`` lines, from the first 64 KiB of the manifest."""
    head = storage.read_bytes(manifest_uri, options, offset=0, length=min(65_536, storage.size(manifest_uri, options)))
    lines = head.count(b"\n") or 1
    per_line = max(1, len(head) // lines)
    return max(1024, per_line * lines_per_shard)


def read_shard(
    shard: Shard, *, default_lang: str, errors: str = "raise", options: storage.StorageOptions | None = None
) -> Iterator[ClipRef | InputError]:
    """The clips of ``shard``: lines starting in its byte range (a line that straddles the end
    belongs to this shard; one that straddles the start belongs to the previous one).

    A line that is not a manifest entry raises :class:`InputError`, or is yielded as one with
    ``errors="yield"`` (batch jobs turn it into an error row and go on)."""
    first = max(0, shard.start - 1)
    data = storage.read_bytes(shard.manifest, options, offset=first, length=shard.end - first)
    while not data.endswith(b"\n") and first + len(data) < shard.total:  # finish the last line
        more = storage.read_bytes(
            shard.manifest, options, offset=first + len(data), length=min(65_536, shard.total - first - len(data))
        )
        nl = more.find(b"\n")
        data += more if nl < 0 else more[: nl + 1]
    # A line starts in [start, end) when the byte before it is a newline (or it is the file's start).
    pos = 0 if shard.start == 0 else data.find(b"\n") + 1
    if shard.start != 0 and pos == 0:
        return
    base = manifest_base(shard.manifest)
    at = shard.start
    while pos < len(data) and first + pos < shard.end:
        nl = data.find(b"\n", pos)
        line = data[pos:] if nl < 0 else data[pos:nl]
        pos = len(data) if nl < 0 else nl + 1
        if line.strip():
            try:
                entry = parse_line(line, base=base, where=f"{shard.manifest} (byte {at})")
            except ManifestError as exc:
                error = InputError(str(exc))
                if errors != "yield":
                    raise error from None
                error.byte = at  # where the line starts: its identity, whatever the sharding
                yield error
            else:
                yield ClipRef(
                    entry.audio_filepath,
                    entry.start_s,
                    entry.duration,
                    entry.requested_lang or default_lang,
                    entry.text,
                )
        at = first + pos


def count_lines(manifest_uri: str, options: storage.StorageOptions | None = None) -> tuple[int, float | None]:
    """Lines of a manifest and the sum of their ``duration`` fields (None if any is missing).

    Streams the file; one pass over a million lines takes a few seconds."""
    fs, path = storage.pyarrow_filesystem(manifest_uri, options)

    def count() -> tuple[int, float | None]:
        with fs.open_input_stream(path) as f:
            return count_entries(iter(lambda: f.read(1 << 22), b""))

    return storage.pyarrow_call(manifest_uri, count)

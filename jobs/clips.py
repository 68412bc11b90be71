"""What a batch job is asked to transcribe: inputs, clip identity, and the plan in shards.

Every input (a folder, a glob, an ``s3://`` prefix or a NeMo manifest) becomes a NeMo JSON-lines
manifest: a manifest is used as it is; a listing is streamed into ``<out>/_plan/inputs.jsonl``
once and reused by every rerun. The manifest is then cut into **shards**: byte ranges of the
file, each holding the lines that start inside it. A shard is the unit of work and of commit:
its results land in one Parquet file, written atomically, so a shard is either done or not.

Neither the listing nor the manifest is ever held in memory: the driver streams the listing to
disk and plans shards from the file size alone; workers read their own byte range.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cluster import storage

#: What a listing keeps (case-insensitive).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aac", ".mp4", ".mkv", ".webm", ".wma", ".aiff")
MANIFEST_SUFFIXES = (".json", ".jsonl", ".manifest")


class InputError(ValueError):
    """The input cannot be planned (missing, empty, unreadable manifest line...)."""

    #: For a bad manifest line: the byte offset where it starts.
    byte: int | None = None


def clip_id(source_uri: str, offset_s: float, duration_s: float | None) -> str:
    """Deterministic id of the clip ``(source_uri, offset_s, duration_s)``; None = to the end."""
    dur = "end" if duration_s is None else f"{duration_s:.3f}"
    key = f"{source_uri}|{offset_s:.3f}|{dur}"
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class ClipRef:
    """One line of the plan: a clip to transcribe (a whole file or a segment of one)."""

    source_uri: str
    offset_s: float = 0.0
    duration_s: float | None = None
    #: The language to ask for: ``auto`` or a locale (the job's ``--lang`` unless the line says).
    lang: str | None = None
    #: A reference transcript when the manifest had one (kept for evaluation, never used to decode).
    text: str | None = None

    @property
    def clip_id(self) -> str:
        return clip_id(self.source_uri, self.offset_s, self.duration_s)


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


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


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
    """Stream the listing of ``source`` into the manifest ``manifest_uri``; returns the count."""
    count = 0
    tmp = manifest_uri + ".part"
    fs, path = storage.pyarrow_filesystem(tmp, options)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        for uri in iter_listing(source, options):
            out.write((json.dumps({"audio_filepath": uri}, ensure_ascii=False) + "\n").encode())
            count += 1
    if count == 0:
        fs.delete_file(path)
        raise InputError(f"{source}: no audio files found (looked for {', '.join(AUDIO_SUFFIXES)}); check the path")
    _, final = storage.pyarrow_filesystem(manifest_uri, options)
    fs.move(path, final)
    return count


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
    base = _manifest_base(shard.manifest)
    at = shard.start
    while pos < len(data) and first + pos < shard.end:
        nl = data.find(b"\n", pos)
        line = data[pos:] if nl < 0 else data[pos:nl]
        pos = len(data) if nl < 0 else nl + 1
        if line.strip():
            try:
                yield parse_manifest_line(
                    line, base=base, default_lang=default_lang, where=f"{shard.manifest} (byte {at})"
                )
            except InputError as exc:
                if errors != "yield":
                    raise
                exc.byte = at  # where the line starts: its identity, whatever the sharding
                yield exc
        at = first + pos


def parse_manifest_line(line: bytes, *, base: str, default_lang: str, where: str) -> ClipRef:
    try:
        row = json.loads(line)
        path = row["audio_filepath"]
    except (ValueError, KeyError, TypeError):
        raise InputError(
            f"{where}: not a NeMo manifest line (need a JSON object with audio_filepath): {line[:120]!r}"
        ) from None
    duration = row.get("duration")  # NeMo reads [offset, offset + duration] when it is given
    return ClipRef(
        source_uri=resolve_audio_path(str(path), base),
        offset_s=float(row.get("offset") or 0.0),
        duration_s=float(duration) if duration is not None else None,
        lang=row.get("lang") or row.get("target_lang") or default_lang,
        text=row.get("text"),
    )


def resolve_audio_path(path: str, base: str) -> str:
    """NeMo's rule: a relative ``audio_filepath`` is relative to the manifest's folder."""
    if storage.is_remote(path) or os.path.isabs(path):
        return path
    if storage.is_remote(base):
        return f"s3://{PurePosixPath(base.removeprefix('s3://')) / path}"
    return str((Path(base) / path).resolve())


def _manifest_base(manifest_uri: str) -> str:
    if storage.is_remote(manifest_uri):
        return manifest_uri.rsplit("/", 1)[0]
    return str(Path(manifest_uri).resolve().parent)


def count_lines(manifest_uri: str, options: storage.StorageOptions | None = None) -> tuple[int, float | None]:
    """Lines of a manifest and the sum of their ``duration`` fields (None if any is missing).

    Streams the file; one pass over a million lines takes a few seconds."""
    count = 0
    total: float | None = 0.0
    fs, path = storage.pyarrow_filesystem(manifest_uri, options)
    with fs.open_input_stream(path) as f:
        pending = b""
        while chunk := f.read(1 << 22):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line.strip():
                    count += 1
                    total = _add_duration(total, line)
        if pending.strip():
            count += 1
            total = _add_duration(total, pending)
    return count, total


def _add_duration(total: float | None, line: bytes) -> float | None:
    if total is None:
        return None
    key = line.find(b'"duration"')
    if key < 0:
        return None
    try:
        rest = line[key + 10 :].lstrip(b" :")
        end = 0
        while end < len(rest) and rest[end : end + 1] in b"0123456789.eE+-":
            end += 1
        return total + float(rest[:end])
    except ValueError:
        return None

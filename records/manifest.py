"""The NeMo manifest: one JSON object per line, one reader and one writer for all of earmark.

earmark reads manifests to transcribe, evaluate and fine-tune, and writes them when it lists a
folder, exports reviews and makes demo sets. Every one of those goes through :class:`ManifestEntry`,
:func:`parse_line` / :func:`read_manifest` and :func:`to_line` / :func:`write_manifest`.

Fields, as NeMo reads them: ``audio_filepath`` (absolute, a URI, or relative to the manifest's
folder, resolved the way NeMo resolves it), ``offset`` and ``duration`` in seconds (NeMo reads
``[offset, offset + duration]``), ``text`` (with language tags the way the model writes them when
it is for training) and ``target_lang`` (the locale the prompt model is trained on: NeMo's
``lang_field``). earmark adds ``clip_id`` and ``origin`` (``review`` | ``pseudo``) on exports,
reads ``lang`` as a synonym of ``target_lang`` on input, and ``text_tagged`` as an evaluation
reference with tags. Other keys are kept as they are (``extra``) and written back.

>>> entry = parse_line(b'{"audio_filepath": "a/1.flac", "duration": 2.5, "text": "Hola. <es-ES>", "lang": "es-ES"}',
...                    base="/data/set")
>>> entry.audio_filepath, entry.start_s, entry.duration, entry.locale
('/data/set/a/1.flac', 0.0, 2.5, 'es-ES')
>>> to_line(ManifestEntry("/data/a.wav", offset=1.0, duration=2.0, text="Hi. <en-US>", target_lang="en-US"))
'{"audio_filepath": "/data/a.wav", "offset": 1.0, "duration": 2.0, "text": "Hi. <en-US>", "target_lang": "en-US"}'
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

#: The manifest key NeMo's prompt dataset reads the locale from (its ``lang_field``).
LANG_FIELD = "target_lang"
#: What a training or dev line must have (besides ``target_lang``, which names the prompt).
REQUIRED_FOR_TRAINING = ("audio_filepath", "duration", "text")
#: ``origin`` of an exported line: a reviewer's correction, or a pseudo-label the router trusted.
ORIGIN_REVIEW, ORIGIN_PSEUDO = "review", "pseudo"
#: File names that are manifests (a folder or prefix is a listing of audio instead).
MANIFEST_SUFFIXES = (".json", ".jsonl", ".manifest")

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_AUTO = "auto"


class ManifestError(ValueError):
    """A manifest line that is not a usable entry; the message names the file, the line and the fix."""


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One line of a NeMo manifest. Optional fields are None when the line does not have them
    (and are then not written)."""

    audio_filepath: str
    #: Seconds into the file where the clip starts (None: the line gave none, i.e. 0).
    offset: float | None = None
    #: Seconds of audio from ``offset`` (None: to the end of the file).
    duration: float | None = None
    text: str | None = None
    target_lang: str | None = None
    #: Accepted on input as a synonym of ``target_lang`` (``auto`` allowed).
    lang: str | None = None
    clip_id: str | None = None
    origin: str | None = None
    #: A reference with language tags as the model writes them (evaluation corpora).
    text_tagged: str | None = None
    #: Every other key of the line, kept as it was.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def start_s(self) -> float:
        return self.offset or 0.0

    @property
    def locale(self) -> str | None:
        """The clip's language: ``target_lang``, else ``lang`` unless it is ``auto``."""
        if self.target_lang:
            return self.target_lang
        return self.lang if self.lang and self.lang != _AUTO else None

    @property
    def requested_lang(self) -> str | None:
        """What to prompt the model with: ``lang`` (``auto`` included), else ``target_lang``."""
        return self.lang or self.target_lang or None

    def missing(self, *names: str) -> list[str]:
        """Those of the fields ``names`` this line does not have (absent or empty)."""
        return [name for name in names if getattr(self, name) in (None, "")]

    def with_audio(self, audio_filepath: str) -> ManifestEntry:
        return replace(self, audio_filepath=audio_filepath)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], *, base: str | None = None) -> ManifestEntry:
        """An entry from a parsed line; a relative ``audio_filepath`` is resolved against ``base``
        (the manifest's folder) when given. Raises ``KeyError``/``TypeError``/``ValueError`` on a
        line that is not an entry (:func:`parse_line` turns them into one :class:`ManifestError`)."""
        path = row["audio_filepath"]
        if not isinstance(path, str) or not path:
            raise TypeError("audio_filepath must be a non-empty string")
        values: dict[str, Any] = {}
        for name in _KNOWN:
            value = row.get(name)
            if value is None:
                continue
            values[name] = float(value) if name in ("offset", "duration") else value
        values["audio_filepath"] = resolve_audio_path(path, base) if base is not None else path
        extra = {k: v for k, v in row.items() if k not in _KNOWN}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The line as NeMo reads it: set fields in a fixed order, then ``extra``."""
        out = {name: getattr(self, name) for name in _KNOWN if getattr(self, name) is not None}
        out.update((k, v) for k, v in self.extra.items() if k not in out)
        return out


_KNOWN = tuple(f.name for f in fields(ManifestEntry) if f.name != "extra")


def parse_line(line: bytes | str, *, base: str | None = None, where: str = "manifest") -> ManifestEntry:
    """One manifest line; ``where`` names it in the error (``file:line`` or ``file (byte N)``)."""
    try:
        row = json.loads(line)
        if not isinstance(row, dict):
            raise TypeError("not an object")
        return ManifestEntry.from_dict(row, base=base)
    except (ValueError, KeyError, TypeError):
        shown = line[:120] if isinstance(line, str) else line[:120].decode("utf-8", "replace")
        raise ManifestError(
            f"{where}: not a NeMo manifest line (need a JSON object with audio_filepath): {shown!r}"
        ) from None


def iter_manifest(
    data: bytes | str, *, base: str | None = None, name: str = "manifest"
) -> Iterator[tuple[int, ManifestEntry]]:
    """(line number, entry) for every line of a whole manifest (blank lines skipped); errors name
    ``name:line``."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise ManifestError(f"{name}: not UTF-8 text; a NeMo manifest is JSON lines") from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield number, parse_line(line, base=base, where=f"{name}:{number}")


def read_manifest(data: bytes | str, *, base: str | None = None, name: str = "manifest") -> list[ManifestEntry]:
    """Every entry of a whole manifest (see :func:`iter_manifest`)."""
    return [entry for _, entry in iter_manifest(data, base=base, name=name)]


def to_line(entry: ManifestEntry) -> str:
    """The entry as one JSON line (no newline), UTF-8 text kept as it is."""
    return json.dumps(entry.to_dict(), ensure_ascii=False)


def write_manifest(entries: Iterable[ManifestEntry]) -> bytes:
    """A whole manifest: one line per entry, each ending in a newline."""
    return "".join(to_line(e) + "\n" for e in entries).encode("utf-8")


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def is_uri(path: str) -> bool:
    """``s3://...`` and the like (not a local path)."""
    return _URI.match(path) is not None


def manifest_base(manifest_uri: str) -> str:
    """The folder relative ``audio_filepath`` values are resolved against."""
    if is_uri(manifest_uri):
        return manifest_uri.rsplit("/", 1)[0]
    return str(Path(manifest_uri).resolve().parent)


def resolve_audio_path(path: str, base: str) -> str:
    """NeMo's rule: a relative ``audio_filepath`` is relative to the manifest's folder ``base``."""
    if is_uri(path) or os.path.isabs(path):
        return path
    if is_uri(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{PurePosixPath(rest) / path}"
    return str((Path(base) / path).resolve())


def count_entries(chunks: Iterable[bytes]) -> tuple[int, float | None]:
    """Lines of a manifest streamed in ``chunks``, and the sum of their ``duration`` fields (None
    when a line has none). Reads the duration without parsing the JSON: a million lines take a
    few seconds, which the progress bar of a job can wait for."""
    count = 0
    total: float | None = 0.0
    for line in _lines(chunks):
        count += 1
        if total is not None:
            total = _add_duration(total, line)
    return count, total


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    pending = b""
    for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending


def _add_duration(total: float, line: bytes) -> float | None:
    key = line.find(b'"duration"')
    if key < 0:
        return None
    rest = line[key + 10 :].lstrip(b" :")
    end = 0
    while end < len(rest) and rest[end : end + 1] in b"0123456789.eE+-":
        end += 1
    try:
        return total + float(rest[:end])
    except ValueError:
        return None

"""Clip identity: a clip is (source URI, offset, duration), and its id is derived from those.

The same input gives the same ids on every run; that is what makes a rerun resume instead of
repeat, and what joins a pseudo-label to its review and its manifest line.

>>> clip_id("s3://archive/a.flac", 60.0, 30.0)
'a1304f4f66cfa4c1'
>>> ClipRef("s3://archive/a.flac", 60.0, 30.0).clip_id == clip_id("s3://archive/a.flac", 60.0, 30.0)
True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def clip_id(source_uri: str, offset_s: float, duration_s: float | None) -> str:
    """Deterministic id of the clip ``(source_uri, offset_s, duration_s)``; None = to the end.

    Times count to the millisecond, so float noise never changes an id."""
    dur = "end" if duration_s is None else f"{duration_s:.3f}"
    key = f"{source_uri}|{offset_s:.3f}|{dur}"
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class ClipRef:
    """A clip to transcribe: a whole file or a segment of one (one line of a job's plan)."""

    source_uri: str
    offset_s: float = 0.0
    duration_s: float | None = None
    #: The language to ask for: ``auto`` or a locale (None: the job's default).
    lang: str | None = None
    #: A reference transcript when the input had one (kept for evaluation, never used to decode).
    text: str | None = None

    @property
    def clip_id(self) -> str:
        return clip_id(self.source_uri, self.offset_s, self.duration_s)

"""``earmark export``: reviewed corrections and trusted pseudo-labels as NeMo manifests.

Writes ``train.jsonl`` and ``dev.jsonl`` (NeMo JSON lines: ``audio_filepath``, ``offset``,
``duration``, ``text``, ``target_lang``, plus ``clip_id`` and ``origin`` = ``review`` | ``pseudo``)
and ``export.json`` (counts per split, origin and language). NeMo's manifest readers and Lhotse's
NeMo adapter load them unchanged; segments of long recordings are exported by offset/duration.

* A clip whose latest review is a submit without the ``unusable_audio`` or ``not_speech`` flag
  is exported with the reviewer's text and language (``origin: review``).
* A clip the router accepted (and at or above ``min_confidence``) is exported as the model wrote
  it (``origin: pseudo``). Rejected, flagged and still-unreviewed clips are left out.
* Text carries language tags the way the model writes them (``Hola. <es-ES> Hello. <en-US>``), so
  fine-tuning keeps language detection: a corrected text without tags gets the reviewer's
  language after each sentence.
* The split is deterministic by ``clip_id`` hash; ``dev`` is drawn from reviewed clips only.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from labeling.models import Clip, Review, Task
from labeling.queue import ReviewQueue
from records.manifest import ORIGIN_PSEUDO, ORIGIN_REVIEW, ManifestEntry, to_line
from records.text import tag_text

#: Review flags that keep a clip out of every export.
DROP_FLAGS = {"unusable_audio", "not_speech"}


@dataclass(frozen=True, slots=True)
class ExportOptions:
    #: Share of reviewed clips that go to dev (by clip-id hash).
    dev_fraction: float = 0.2
    #: Pseudo-labels under this utterance confidence are left out (None = every accepted clip).
    min_confidence: float | None = None
    #: Also export accepted pseudo-labels (False = reviewed clips only).
    include_pseudo: bool = True


def in_dev(clip_id: str, fraction: float) -> bool:
    """Deterministic: the same clip lands in the same split on every export."""
    bucket = int(hashlib.sha256(clip_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """``export.json``: lines per split, then per origin (``review`` | ``pseudo``), then per language."""

    project: str
    out: str
    options: ExportOptions
    train: dict[str, dict[str, int]]
    dev: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_manifests(
    queue: ReviewQueue, project: str, out: str | Path, options: ExportOptions | None = None
) -> ExportSummary:
    options = options or ExportOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter[tuple[str, str, str]] = Counter()
    with queue.Session() as s:
        pid = queue.project_id(s, project)
        latest = _latest_submits(s, pid)
        with (
            (out / "train.jsonl.part").open("w", encoding="utf-8") as train,
            (out / "dev.jsonl.part").open("w", encoding="utf-8") as dev,
        ):
            query = select(Clip).where(Clip.project_id == pid, Clip.status == "ok").order_by(Clip.id)
            for clip in s.scalars(query.execution_options(yield_per=5000)):
                review = latest.get(clip.id)
                if review is not None:
                    if DROP_FLAGS & set(review.flags or ()):
                        continue
                    lang = review.lang_after or clip.lang_detected or _requested(clip)
                    entry = _entry(clip, tag_text(review.text_after or "", lang), lang, ORIGIN_REVIEW)
                    split = "dev" if in_dev(clip.clip_id, options.dev_fraction) else "train"
                elif clip.decision == "accept" and options.include_pseudo:
                    if options.min_confidence is not None and (clip.confidence or 0.0) < options.min_confidence:
                        continue
                    entry = _entry(clip, clip.text_raw or "", clip.lang_detected or _requested(clip), ORIGIN_PSEUDO)
                    split = "train"
                else:
                    continue
                (dev if split == "dev" else train).write(to_line(entry) + "\n")
                counts[(split, entry.origin or "-", entry.target_lang or "-")] += 1
    for name in ("train", "dev"):
        (out / f"{name}.jsonl.part").replace(out / f"{name}.jsonl")
    splits: dict[str, dict[str, dict[str, int]]] = {"train": {}, "dev": {}}
    for (split, origin, lang), n in sorted(counts.items()):
        splits[split].setdefault(origin, {})[lang] = n
    summary = ExportSummary(project, str(out), options, train=splits["train"], dev=splits["dev"])
    (out / "export.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return summary


def _latest_submits(s: Any, pid: int) -> dict[int, Review]:
    """clip pk -> its latest submit review, for tasks that are done now (a reopened task is not)."""
    rows = s.execute(
        select(Review)
        .join(Task, Task.id == Review.task_id)
        .where(Task.project_id == pid, Task.state == "done", Review.action == "submit")
        .order_by(Review.id)
    ).scalars()
    return {r.clip_pk: r for r in rows}


def _requested(clip: Clip) -> str | None:
    return clip.lang_requested if clip.lang_requested and clip.lang_requested != "auto" else None


def _entry(clip: Clip, text: str, lang: str | None, origin: str) -> ManifestEntry:
    return ManifestEntry(
        audio_filepath=clip.source_uri,
        offset=clip.offset_s,
        duration=clip.duration_s,
        text=text,
        target_lang=lang,
        clip_id=clip.clip_id,
        origin=origin,
    )

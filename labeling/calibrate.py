"""``earmark calibrate``: how the model's confidence relates to real errors, per language.

From reviewed clips (the reviewer's text is the truth), per language:

* the WER of the pseudo-labels against the corrections, overall and in confidence bins;
* a suggested utterance-confidence threshold: the lowest ``t`` such that the clips at or above
  ``t`` have a WER (summed errors / summed words) at most ``target_wer``: the router accepts
  those, and reviews the rest.

The numbers are from reviewed clips only, which the router chose because they looked unsure, so
they are pessimistic for the confident end; review a random sample too for an unbiased estimate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from labeling.export import DROP_FLAGS
from labeling.models import Clip, Review, Task
from labeling.queue import ReviewQueue
from records.text import word_errors


@dataclass
class LanguageCalibration:
    lang: str
    clips: int = 0
    errors: int = 0
    words: int = 0
    points: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def wer(self) -> float:
        return self.errors / self.words if self.words else 0.0

    def threshold_for(self, target_wer: float) -> float | None:
        """Lowest confidence cut whose accepted side meets ``target_wer`` (None if none does)."""
        ordered = sorted(self.points, key=lambda p: -p[0])  # most confident first
        errors = words = 0
        best = None
        for conf, e, n in ordered:
            errors, words = errors + e, words + n
            if words and errors / words <= target_wer:
                best = conf
        return best

    def bins(self, edges: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.01)) -> list[ConfidenceBin]:
        out = []
        for lo, hi in zip(edges, edges[1:], strict=False):
            inside = [(e, n) for c, e, n in self.points if lo <= c < hi]
            e, n = sum(x for x, _ in inside), sum(y for _, y in inside)
            out.append(ConfidenceBin(f"{lo:.1f}-{min(hi, 1.0):.1f}", len(inside), e / n if n else None))
        return out


@dataclass(frozen=True, slots=True)
class ConfidenceBin:
    confidence: str
    clips: int
    wer: float | None


@dataclass(frozen=True, slots=True)
class LanguageThreshold:
    reviewed_clips: int
    pseudo_label_wer: float
    #: The lowest utterance confidence whose clips meet the target WER (None: none does).
    suggested_threshold: float | None
    bins: list[ConfidenceBin]


@dataclass(frozen=True, slots=True)
class Calibration:
    project: str
    target_wer: float
    languages: dict[str, LanguageThreshold]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(queue: ReviewQueue, project: str, *, target_wer: float = 0.05) -> Calibration:
    per_lang: dict[str, LanguageCalibration] = {}
    with queue.Session() as s:
        pid = queue.project_id(s, project)
        rows = s.execute(
            select(Clip.lang_detected, Clip.confidence, Clip.text, Review.text_after, Review.lang_after, Review.flags)
            .join(Review, Review.clip_pk == Clip.id)
            .join(Task, Task.id == Review.task_id)
            .where(Clip.project_id == pid, Task.state == "done", Review.action == "submit")
            .order_by(Review.id)
        ).all()
    for lang, conf, text, corrected, lang_after, flags in rows:
        if conf is None or DROP_FLAGS & set(flags or ()):
            continue
        key = lang_after or lang or "-"
        cal = per_lang.setdefault(key, LanguageCalibration(key))
        e, n = word_errors(corrected or "", text or "")
        cal.clips, cal.errors, cal.words = cal.clips + 1, cal.errors + e, cal.words + n
        cal.points.append((float(conf), e, n))
    languages = {
        lang: LanguageThreshold(cal.clips, cal.wer, cal.threshold_for(target_wer), cal.bins())
        for lang, cal in sorted(per_lang.items())
    }
    return Calibration(project, target_wer, languages)

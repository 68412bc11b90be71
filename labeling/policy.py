"""Routing: which pseudo-labels are trusted, which a person must check, which are kept out.

Pure functions over records of the pseudo-label table (:class:`records.pseudo_labels.PseudoLabel`);
``earmark route`` (:mod:`labeling.ingest`) runs exactly these, row by row and then the budget:

>>> labels = from_table(pyarrow.parquet.read_table("labels/"))          # doctest: +SKIP
>>> [d.decision for d in route(labels, Policy())]                        # doctest: +SKIP
['accept', 'review', 'reject', ...]

Rules (each failing rule adds a reason; any reason sends the row to review):

* ``error`` rows are kept out (``reject``), with their error as the reason;
* utterance confidence under the language's threshold (``confidence``, per language, with a default);
* any word under ``word_confidence``;
* language problems: no language tag at all, a detected language other than the one requested,
  several languages in one clip (unless ``allow_code_switching``);
* hallucination signs: an n-gram repeated ``max_ngram_repeats`` times or more, characters per
  second outside ``chars_per_s``, an empty transcript on ``min_voiced_s`` or more of audio.

Then the **review budget**: at most ``max_per_language`` rows per language and ``max_fraction``
of all rows go to review, least confident first (a row without a confidence before every other;
ties by ``clip_id``, so the result never depends on input order); rows over the budget are
rejected (unverified and suspicious: not for training).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from records.pseudo_labels import PseudoLabel

ACCEPT, REVIEW, REJECT = "accept", "review", "reject"
OVER_BUDGET = "over the review budget"


@dataclass(frozen=True, slots=True)
class Policy:
    """Thresholds of the routing rules; ``Policy.from_dict(yaml.safe_load(...))`` reads a file."""

    #: Utterance confidence below which a clip goes to review, per language; ``default`` otherwise.
    confidence: Mapping[str, float] = field(default_factory=lambda: {"default": 0.5})
    #: Any word below this sends the clip to review.
    word_confidence: float = 0.2
    allow_code_switching: bool = False
    #: (n, times): an n-gram of words repeated ``times`` or more is a hallucination sign.
    ngram: int = 3
    max_ngram_repeats: int = 3
    #: Plausible speaking rate (characters of text per second of audio).
    chars_per_s: tuple[float, float] = (2.0, 30.0)
    #: An empty transcript on this much audio or more is suspicious.
    min_voiced_s: float = 1.0
    #: Review budget: at most this many rows per language (None = no limit) ...
    max_per_language: int | None = None
    #: ... and at most this fraction of all rows (None = no limit).
    max_fraction: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown policy fields {unknown}; the fields are {sorted(known)}")
        values = dict(data)
        if isinstance(values.get("confidence"), int | float):
            values["confidence"] = {"default": float(values["confidence"])}
        if "chars_per_s" in values:
            values["chars_per_s"] = tuple(values["chars_per_s"])
        return cls(**values)

    def threshold(self, lang: str | None) -> float:
        return float(self.confidence.get(lang or "", self.confidence.get("default", 0.5)))

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class Decision:
    clip_id: str
    decision: str
    reasons: tuple[str, ...]
    #: The language the budget counts the row under.
    lang: str | None
    #: Lower = more urgent: the utterance confidence; None (no confidence) before everything.
    priority: float | None

    @property
    def task_priority(self) -> float:
        """The review task's order key: the priority, a clip without a confidence as 0 (the least
        confident a clip can be)."""
        return 0.0 if self.priority is None else self.priority


def priority(label: PseudoLabel) -> float | None:
    """How urgent a review of ``label`` is: its utterance confidence (None when it has none)."""
    conf = label.confidence
    return None if conf is None or math.isnan(conf) else float(conf)


def decide(label: PseudoLabel, policy: Policy) -> Decision:
    """The decision for one row before the budget, with its reasons and priority."""
    decision, reasons = check(label, policy)
    return Decision(label.clip_id, decision, reasons, label.lang_detected, priority(label))


def check(label: PseudoLabel, policy: Policy) -> tuple[str, tuple[str, ...]]:
    """The decision for one row before the budget, and why."""
    if not label.ok:
        return REJECT, (f"error: {label.error or 'unknown'}",)
    reasons: list[str] = []
    text = (label.text or "").strip()
    duration = float(label.duration_s or 0.0)
    lang = label.lang_detected
    conf = priority(label)
    if conf is not None and conf < policy.threshold(lang):
        reasons.append(f"confidence {conf:.2f} < {policy.threshold(lang):.2f} ({lang or 'no language'})")
    low = [w for w in label.words if w.confidence < policy.word_confidence]
    if low:
        worst = min(low, key=lambda w: w.confidence)
        reasons.append(
            f"{len(low)} word(s) under {policy.word_confidence:.2f} (lowest {worst.word!r} {worst.confidence:.2f})"
        )
    if not text:
        if duration >= policy.min_voiced_s:
            reasons.append(f"empty transcript on {duration:.1f} s of audio")
        return (REVIEW if reasons else ACCEPT), tuple(reasons)
    langs = label.sentence_langs
    if not any(langs):
        reasons.append("no language tag")
    requested = label.lang_requested
    if requested and requested != "auto" and lang and lang != requested:
        reasons.append(f"language {lang} detected, {requested} requested")
    distinct = sorted({x for x in langs if x})
    if len(distinct) > 1 and not policy.allow_code_switching:
        reasons.append(f"several languages: {', '.join(distinct)}")
    repeated = repeated_ngram(text, policy.ngram)
    if repeated and repeated[1] >= policy.max_ngram_repeats:
        reasons.append(f"{policy.ngram}-gram {repeated[0]!r} repeated {repeated[1]} times")
    if duration > 0:
        rate = len(text) / duration
        low_rate, high_rate = policy.chars_per_s
        if not low_rate <= rate <= high_rate:
            reasons.append(f"{rate:.1f} characters/s outside {low_rate:g}-{high_rate:g}")
    return (REVIEW if reasons else ACCEPT), tuple(reasons)


def route(labels: Iterable[PseudoLabel], policy: Policy) -> list[Decision]:
    """Decisions for ``labels`` (in their order), the review budget applied."""
    return apply_budget([decide(label, policy) for label in labels], policy)


def apply_budget(decisions: Sequence[Decision], policy: Policy) -> list[Decision]:
    """Keep the least confident reviews within the budget; the rest become rejects."""
    kept = budget_keep([d for d in decisions if d.decision == REVIEW], total=len(decisions), policy=policy)
    return [within_budget(d, kept) for d in decisions]


def within_budget(decision: Decision, kept: set[str]) -> Decision:
    """``decision`` once the budget has chosen ``kept``: a review it did not keep becomes a reject."""
    if decision.decision != REVIEW or decision.clip_id in kept:
        return decision
    return replace(decision, decision=REJECT, reasons=(*decision.reasons, OVER_BUDGET))


def budget_keep(reviews: Iterable[Decision], *, total: int, policy: Policy) -> set[str]:
    """The ``clip_id`` s of ``reviews`` that fit the budget (``total`` = all rows routed)."""
    reviews = sorted(reviews, key=lambda d: (d.priority is not None, d.priority or 0.0, d.clip_id))
    overall = math.inf if policy.max_fraction is None else math.floor(policy.max_fraction * total)
    per_lang: Counter[str | None] = Counter()
    kept: set[str] = set()
    for d in reviews:
        if len(kept) >= overall:
            break
        if policy.max_per_language is not None and per_lang[d.lang] >= policy.max_per_language:
            continue
        per_lang[d.lang] += 1
        kept.add(d.clip_id)
    return kept


def repeated_ngram(text: str, n: int) -> tuple[str, int] | None:
    """The most repeated word n-gram of ``text`` and its count (None when too short)."""
    words = [w.strip(".,;:!?¿¡\"'").lower() for w in text.split()]
    joined = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not joined:
        return None
    if len(set(joined)) == len(joined):  # the common case, without a Counter: every n-gram once
        return max(joined), 1
    gram, count = max(Counter(joined).items(), key=lambda kv: (kv[1], kv[0]))
    return gram, count


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value

"""Routing: which pseudo-labels are trusted, which a person must check, which are kept out.

A pure policy over rows of the pseudo-label table (plain dicts, as ``pyarrow`` gives them):

>>> policy = Policy()
>>> row = {"clip_id": "a", "status": "ok", "text": "Hola amigo.", "duration_s": 1.2, "confidence": 0.9,
...        "lang_requested": "auto", "lang_detected": "es-ES", "sentences": [{"lang": "es-ES"}],
...        "words": [{"word": "Hola", "confidence": 0.9}, {"word": "amigo.", "confidence": 0.95}]}
>>> route([row], policy)[0].decision
'accept'

Rules (each failing rule adds a reason; any reason sends the row to review):

* ``error`` rows are kept out (``reject``), with their error as the reason;
* utterance confidence under the language's threshold (``confidence``, per language, with a default);
* any word under ``word_confidence``;
* language problems: no language tag at all, a detected language other than the one requested,
  several languages in one clip (unless ``allow_code_switching``);
* hallucination signs: an n-gram repeated ``max_ngram_repeats`` times or more, characters per
  second outside ``chars_per_s``, an empty transcript on ``min_voiced_s`` or more of audio.

Then the **review budget**: at most ``max_per_language`` rows per language and ``max_fraction``
of all rows go to review, least confident first (ties by ``clip_id``, so the result never depends
on input order); rows over the budget are rejected (unverified and suspicious: not for training).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ACCEPT, REVIEW, REJECT = "accept", "review", "reject"


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
    #: Lower = more urgent (the utterance confidence; errors and empty rows first).
    priority: float


def check(row: Mapping[str, Any], policy: Policy) -> tuple[str, tuple[str, ...]]:
    """The decision for one row before the budget, and why."""
    if row.get("status") != "ok":
        return REJECT, (f"error: {row.get('error') or 'unknown'}",)
    reasons: list[str] = []
    text = (row.get("text") or "").strip()
    duration = float(row.get("duration_s") or 0.0)
    lang = row.get("lang_detected")
    conf = row.get("confidence")
    if conf is not None and conf < policy.threshold(lang):
        reasons.append(f"confidence {conf:.2f} < {policy.threshold(lang):.2f} ({lang or 'no language'})")
    low = [
        w
        for w in row.get("words") or ()
        if w.get("confidence") is not None and w["confidence"] < policy.word_confidence
    ]
    if low:
        worst = min(low, key=lambda w: w["confidence"])
        reasons.append(
            f"{len(low)} word(s) under {policy.word_confidence:.2f} (lowest {worst['word']!r} {worst['confidence']:.2f})"
        )
    if not text:
        if duration >= policy.min_voiced_s:
            reasons.append(f"empty transcript on {duration:.1f} s of audio")
        return (REVIEW if reasons else ACCEPT), tuple(reasons)
    langs = [s.get("lang") for s in row.get("sentences") or ()]
    if not any(langs):
        reasons.append("no language tag")
    requested = row.get("lang_requested")
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


def route(rows: Iterable[Mapping[str, Any]], policy: Policy) -> list[Decision]:
    """Decisions for ``rows`` (in their order), the review budget applied."""
    decisions = []
    for row in rows:
        decision, reasons = check(row, policy)
        conf = row.get("confidence")
        priority = -1.0 if conf is None or (isinstance(conf, float) and math.isnan(conf)) else float(conf)
        decisions.append(Decision(row["clip_id"], decision, reasons, row.get("lang_detected"), priority))
    return apply_budget(decisions, policy)


def apply_budget(decisions: Sequence[Decision], policy: Policy) -> list[Decision]:
    """Keep the least confident reviews within the budget; the rest become rejects."""
    kept = budget_keep([d for d in decisions if d.decision == REVIEW], total=len(decisions), policy=policy)
    return [
        Decision(d.clip_id, REJECT, (*d.reasons, "over the review budget"), d.lang, d.priority)
        if d.decision == REVIEW and d.clip_id not in kept
        else d
        for d in decisions
    ]


def budget_keep(reviews: Iterable[Decision], *, total: int, policy: Policy) -> set[str]:
    """The ``clip_id`` s of ``reviews`` that fit the budget (``total`` = all rows routed)."""
    reviews = sorted(reviews, key=lambda d: (d.priority, d.clip_id))
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

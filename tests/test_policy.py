"""The routing policy on pseudo-label records: every rule, the review budget, ties, missing
confidences; and ``earmark route`` deciding exactly what the policy decides."""

from __future__ import annotations

import datetime as dt
import math
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from labeling.policy import ACCEPT, REJECT, REVIEW, Policy, check, repeated_ngram, route
from records.pseudo_labels import PseudoLabel, to_table


def row(clip_id: str = "c1", **over) -> PseudoLabel:
    """A pseudo-label; ``over`` replaces fields (sentences and words may give only some keys)."""
    base = {
        "clip_id": clip_id,
        "item_id": clip_id,
        "source_uri": f"/audio/{clip_id}.flac",
        "source_hash": None,
        "offset_s": 0.0,
        "duration_s": 2.0,
        "segment_index": 0,
        "segment_count": 1,
        "status": "ok",
        "error": None,
        "text": "Hola amigo, buenos días.",
        "text_raw": "Hola amigo, buenos días. <es-ES>",
        "lang_requested": "auto",
        "lang_detected": "es-ES",
        "sentences": [{"text": "Hola amigo, buenos días.", "lang": "es-ES"}],
        "words": [{"word": w, "confidence": 0.9} for w in ("Hola", "amigo,", "buenos", "días.")],
        "confidence": 0.9,
        "ref_text": None,
        "model_id": "demo@test",
        "att_context": [56, 13],
        "run_id": "run-1",
        "created_at": dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
    } | over
    base["sentences"] = [
        {"text": "", "lang": None, "start_s": 0.0, "end_s": 1.0, "confidence": 0.9} | s for s in base["sentences"]
    ]
    base["words"] = [{"word": "", "start_s": 0.0, "end_s": 0.5, "confidence": 0.9} | w for w in base["words"]]
    return PseudoLabel.from_row(base)


def reasons(r: PseudoLabel, policy: Policy | None = None) -> tuple[str, tuple[str, ...]]:
    return check(r, policy or Policy())


def test_a_confident_clean_row_is_accepted() -> None:
    assert reasons(row()) == (ACCEPT, ())


def test_error_rows_are_kept_out_with_their_error() -> None:
    decision, why = reasons(row(status="error", error="truncated file", text=None, confidence=None))
    assert decision == REJECT and why == ("error: truncated file",)


def test_low_utterance_confidence_uses_the_language_threshold() -> None:
    policy = Policy(confidence={"default": 0.5, "es-ES": 0.95})
    decision, why = reasons(row(), policy)
    assert decision == REVIEW and why == ("confidence 0.90 < 0.95 (es-ES)",)
    assert reasons(row(lang_detected="de-DE", sentences=[{"lang": "de-DE"}]), policy)[0] == ACCEPT


def test_one_low_word_sends_the_clip_to_review() -> None:
    words = [{"word": "Hola", "confidence": 0.9}, {"word": "amigo", "confidence": 0.05}]
    decision, why = reasons(row(words=words))
    assert decision == REVIEW and why == ("1 word(s) under 0.20 (lowest 'amigo' 0.05)",)


def test_language_problems_are_reasons() -> None:
    assert reasons(row(sentences=[{"lang": None}], lang_detected=None))[1] == ("no language tag",)
    assert reasons(row(lang_requested="de-DE"))[1] == ("language es-ES detected, de-DE requested",)
    mixed = [{"lang": "es-ES"}, {"lang": "en-US"}]
    assert reasons(row(sentences=mixed))[1] == ("several languages: en-US, es-ES",)
    assert reasons(row(sentences=mixed), Policy(allow_code_switching=True))[0] == ACCEPT


def test_hallucination_signs_are_reasons() -> None:
    looped = "the cat sat the cat sat the cat sat"
    assert repeated_ngram(looped, 3) == ("the cat sat", 3)
    assert reasons(row(text=looped, duration_s=3.0))[1] == ("3-gram 'the cat sat' repeated 3 times",)
    assert reasons(row(text="Hola.", duration_s=10.0))[1] == ("0.5 characters/s outside 2-30",)
    assert reasons(row(text="x" * 100, duration_s=1.0))[1] == ("100.0 characters/s outside 2-30",)
    assert reasons(row(text="", words=[], duration_s=4.0))[1] == ("empty transcript on 4.0 s of audio",)
    assert reasons(row(text="", words=[], duration_s=0.5)) == (ACCEPT, ())  # a short silence may be empty


def test_several_reasons_are_all_given() -> None:
    decision, why = reasons(row(confidence=0.1, lang_requested="fr-FR"))
    assert decision == REVIEW and len(why) == 2


def _many(n: int, langs: tuple[str, ...] = ("es-ES", "de-DE"), seed: int = 0) -> list[PseudoLabel]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lang = langs[i % len(langs)]
        rows.append(row(f"c{i:03d}", confidence=round(rng.random(), 3), lang_detected=lang, sentences=[{"lang": lang}]))
    return rows


def test_the_budget_keeps_the_least_confident_per_language() -> None:
    rows = _many(100)
    decisions = route(rows, Policy(confidence={"default": 0.8}, max_per_language=5))
    kept = [d for d in decisions if d.decision == REVIEW]
    assert len(kept) == 10
    for lang in ("es-ES", "de-DE"):
        lowest = sorted(r.confidence for r in rows if r.lang_detected == lang)[:5]
        assert sorted(d.priority for d in kept if d.lang == lang) == lowest
    over = [d for d in decisions if d.decision == REJECT]
    assert over and all(d.reasons[-1] == "over the review budget" for d in over)
    assert sum(d.decision == ACCEPT for d in decisions) == sum(r.confidence >= 0.8 for r in rows)


def test_the_budget_caps_the_overall_fraction() -> None:
    decisions = route(_many(200), Policy(confidence={"default": 0.9}, max_fraction=0.05))
    assert sum(d.decision == REVIEW for d in decisions) == 10


def test_ties_are_broken_by_clip_id_whatever_the_input_order() -> None:
    rows = [row(f"c{i}", confidence=0.3) for i in range(6)]
    policy = Policy(max_per_language=2)
    first = {d.clip_id: d.decision for d in route(rows, policy)}
    again = {d.clip_id: d.decision for d in route(list(reversed(rows)), policy)}
    assert first == again
    assert [c for c, d in sorted(first.items()) if d == REVIEW] == ["c0", "c1"]


def test_a_policy_reads_from_plain_data_and_rejects_unknown_fields() -> None:
    policy = Policy.from_dict(
        {"confidence": {"default": 0.6, "de-DE": 0.7}, "chars_per_s": [1, 40], "max_fraction": 0.1}
    )
    assert policy.threshold("de-DE") == 0.7 and policy.threshold("xx") == 0.6
    assert Policy.from_dict({"confidence": 0.4}).threshold("es-ES") == 0.4
    with pytest.raises(ValueError, match="unknown policy fields \\['word_conf'\\]"):
        Policy.from_dict({"word_conf": 0.1})


def test_a_clip_without_a_confidence_is_reviewed_first_and_never_by_a_sentinel() -> None:
    unsure = [{"word": "Hola", "confidence": 0.1}]  # a review candidate, whatever its confidence
    rows = [row(f"c{i}", confidence=0.3) for i in range(3)] + [
        row("z-none", confidence=None, words=unsure),
        row("z-nan", confidence=math.nan, words=unsure),
    ]
    decisions = {d.clip_id: d for d in route(rows, Policy(confidence={"default": 0.5}, max_per_language=2))}
    assert decisions["z-none"].priority is None and decisions["z-nan"].priority is None
    assert [c for c, d in sorted(decisions.items()) if d.decision == REVIEW] == ["z-nan", "z-none"]
    assert decisions["z-none"].task_priority == 0.0  # the queue's order: as unsure as a clip can be


def test_earmark_route_decides_exactly_what_the_policy_decides(tmp_path: Path) -> None:
    """Production routing (two streaming passes into the database) runs the tested functions."""
    from sqlalchemy import select

    from labeling.ingest import route_table
    from labeling.models import Clip
    from labeling.queue import ReviewQueue

    rows = _many(120, langs=("es-ES", "de-DE", "fr-FR")) + [row("err", status="error", error="truncated file")]
    pq.write_table(to_table(rows), tmp_path / "labels.parquet")
    policy = Policy(confidence={"default": 0.7}, max_per_language=7, max_fraction=0.15)
    queue = ReviewQueue.connect(f"sqlite:///{tmp_path / 'review.db'}")

    route_table(queue, "p", str(tmp_path / "labels.parquet"), policy, batch_rows=17)

    with queue.Session() as s:
        stored = {c: (d, tuple(r)) for c, d, r in s.execute(select(Clip.clip_id, Clip.decision, Clip.reasons))}
    assert stored == {d.clip_id: (d.decision, d.reasons) for d in route(rows, policy)}

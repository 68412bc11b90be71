"""The routing policy on plain rows: every rule, the review budget, ties."""

from __future__ import annotations

import random

import pytest

from labeling.policy import ACCEPT, REJECT, REVIEW, Policy, check, repeated_ngram, route


def row(clip_id: str = "c1", **over) -> dict:
    base = {
        "clip_id": clip_id,
        "status": "ok",
        "error": None,
        "text": "Hola amigo, buenos días.",
        "duration_s": 2.0,
        "confidence": 0.9,
        "lang_requested": "auto",
        "lang_detected": "es-ES",
        "sentences": [{"text": "Hola amigo, buenos días.", "lang": "es-ES"}],
        "words": [{"word": w, "confidence": 0.9} for w in ("Hola", "amigo,", "buenos", "días.")],
    }
    return base | over


def reasons(r: dict, policy: Policy | None = None) -> tuple[str, tuple[str, ...]]:
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


def _many(n: int, langs: tuple[str, ...] = ("es-ES", "de-DE"), seed: int = 0) -> list[dict]:
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
        lowest = sorted(r["confidence"] for r in rows if r["lang_detected"] == lang)[:5]
        assert sorted(d.priority for d in kept if d.lang == lang) == lowest
    over = [d for d in decisions if d.decision == REJECT]
    assert over and all(d.reasons[-1] == "over the review budget" for d in over)
    assert sum(d.decision == ACCEPT for d in decisions) == sum(r["confidence"] >= 0.8 for r in rows)


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

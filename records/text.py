"""Text rules: language tags in model text, the one normaliser, and word/character error counts.

The prompt model writes the language it heard after each sentence: ``"Hola. <es-ES> Hallo. <de-DE>"``.
Those tags are the language detection; this module turns them into per-sentence languages,
removes them from the text people read, and adds them to text that lacks them (for training).
Every WER in earmark (evaluation, the gate, calibration, the demo) counts errors with
:func:`word_errors` after :func:`normalize`, so the figures measure the same thing.

>>> [(s.text, s.lang) for s in split_tagged("Hola amigo. <es-ES> Wie geht es? <de-DE>")]
[('Hola amigo.', 'es-ES'), ('Wie geht es?', 'de-DE')]
>>> strip_tags("Hola amigo. <es-ES> Wie geht es? <de-DE>")
'Hola amigo. Wie geht es?'
>>> tag_text("Hola. Que tal?", "es-ES")
'Hola. <es-ES> Que tal? <es-ES>'
>>> normalize("¿Qué tal? <es-ES> C'est  l'été!")
"qué tal c'est l'été"
>>> word_errors("Hola amigo.", "hola a migo")
(2, 2)
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

#: A language tag as the model writes it: ``<de-DE>`` (the locale in angle brackets).
TAG_RE = re.compile(r"<([a-z]{2,3}-[A-Z]{2})>")
_SENTENCE_END_RE = re.compile(r"([.?!])(?=\s|$)")


@dataclass(frozen=True, slots=True)
class TaggedSentence:
    text: str
    #: The locale tag the model wrote after the sentence; None for a trailing untagged part.
    lang: str | None


def split_tagged(text: str) -> list[TaggedSentence]:
    """Split model output into sentences, each with the tag that closed it."""
    out: list[TaggedSentence] = []
    pos = 0
    for match in TAG_RE.finditer(text):
        chunk = text[pos : match.start()].strip()
        if chunk:
            out.append(TaggedSentence(chunk, match.group(1)))
        elif out and out[-1].lang is None:
            out[-1] = TaggedSentence(out[-1].text, match.group(1))
        pos = match.end()
    tail = text[pos:].strip()
    if tail:
        out.append(TaggedSentence(tail, None))
    return out


def strip_tags(text: str) -> str:
    return re.sub(r"\s+", " ", TAG_RE.sub(" ", text)).strip()


def tag_text(text: str, lang: str | None) -> str:
    """Text the way the model writes it: ``lang``'s tag after each sentence; tagged text is kept."""
    text = " ".join(text.split())
    if not lang or not text or TAG_RE.search(text):
        return text
    tagged = _SENTENCE_END_RE.sub(lambda m: f"{m.group(1)} <{lang}>", text)
    return tagged if tagged.endswith(">") else f"{tagged} <{lang}>"


def normalize(text: str) -> str:
    """Lower case, no tags, no punctuation, single spaces (letters of every script, digits,
    apostrophes and hyphens kept): the form every WER in earmark compares."""
    text = unicodedata.normalize("NFC", strip_tags(text)).lower()
    text = "".join(ch if ch.isalnum() or ch.isspace() or ch in "'-" else " " for ch in text)
    return " ".join(text.split())


def word_errors(reference: str, hypothesis: str, *, normalized: bool = True) -> tuple[int, int]:
    """(edits, reference words): the numerator and denominator of WER, via jiwer.

    Both texts go through :func:`normalize` first; ``normalized=False`` compares them as given
    (case and punctuation count: the "raw" WER)."""
    if normalized:
        reference, hypothesis = normalize(reference), normalize(hypothesis)
    return _edits(reference.split(), hypothesis.split(), reference, hypothesis, characters=False)


def char_errors(reference: str, hypothesis: str, *, normalized: bool = True) -> tuple[int, int]:
    """(edits, reference characters): the numerator and denominator of CER, via jiwer."""
    if normalized:
        reference, hypothesis = normalize(reference), normalize(hypothesis)
    return _edits(list(reference), list(hypothesis), reference, hypothesis, characters=True)


def matched_words(reference: str, words: list[str]) -> list[bool] | None:
    """Which of the hypothesis ``words`` a word alignment with ``reference`` (jiwer) matches, both
    normalised; None when a word normalises to several (its place in the alignment is unclear).

    >>> matched_words("Hola amigo mío.", ["Hola", "amiga", "mío."])
    [True, False, True]
    """
    hyp = [normalize(w) for w in words]
    if any(len(h.split()) > 1 for h in hyp):
        return None
    ref = normalize(reference)
    kept = [k for k, h in enumerate(hyp) if h]  # words that normalise to nothing (".") are never right
    right = [False] * len(words)
    if not kept or not ref:
        return right
    import jiwer

    out = jiwer.process_words(ref, " ".join(hyp[k] for k in kept))
    for chunk in out.alignments[0]:
        if chunk.type == "equal":
            for j in range(chunk.hyp_start_idx, chunk.hyp_end_idx):
                right[kept[j]] = True
    return right


def _edits(ref: list[str], hyp: list[str], reference: str, hypothesis: str, *, characters: bool) -> tuple[int, int]:
    if not ref:
        return len(hyp), 0
    if not hyp:
        return len(ref), len(ref)
    import jiwer

    out = (jiwer.process_characters if characters else jiwer.process_words)(reference, hypothesis)
    return out.substitutions + out.deletions + out.insertions, out.hits + out.substitutions + out.deletions

"""Language tags in model text, and word error counting.

The prompt model writes the language it heard after each sentence: ``"Hola. <es-ES> Hallo. <de-DE>"``.
Those tags are the language detection; this module turns them into per-sentence languages and
removes them from the text people read.

>>> [(s.text, s.lang) for s in split_tagged("Hola amigo. <es-ES> Wie geht es? <de-DE>")]
[('Hola amigo.', 'es-ES'), ('Wie geht es?', 'de-DE')]
>>> strip_tags("Hola amigo. <es-ES> Wie geht es? <de-DE>")
'Hola amigo. Wie geht es?'
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

TAG_RE = re.compile(r"<([a-z]{2,3}-[A-Z]{2})>")


@dataclass(frozen=True, slots=True)
class TaggedSentence:
    text: str
    #: The locale tag the model wrote after the sentence; None for a trailing untagged part.
    lang: str | None


def is_tag(token: str) -> bool:
    return TAG_RE.fullmatch(token.strip()) is not None


def split_tagged(text: str) -> list[TaggedSentence]:
    """Split model output into sentences, each with the tag that closed it."""
    out, pos = [], 0
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


def normalize_for_wer(text: str) -> str:
    """Lower case, no tags, no punctuation, single spaces (letters of every script kept)."""
    text = unicodedata.normalize("NFC", strip_tags(text)).lower()
    text = "".join(ch if ch.isalnum() or ch.isspace() or ch in "'-" else " " for ch in text)
    return " ".join(text.split())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edits, reference words): the numerator and denominator of WER, via jiwer."""
    ref_words, hyp_words = reference.split(), hypothesis.split()
    if not ref_words:
        return len(hyp_words), 0
    if not hyp_words:
        return len(ref_words), len(ref_words)
    import jiwer

    out = jiwer.process_words(reference, hypothesis)
    return out.substitutions + out.deletions + out.insertions, len(ref_words)

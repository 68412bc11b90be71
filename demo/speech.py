"""Synthetic multilingual speech from espeak-ng, for the demo model, the sample corpus and tests.

Everything here is deterministic for a given seed: the same seed gives the same sentences,
voices and samples, so corpora can be rebuilt byte for byte.

>>> rng = random.Random(0)
>>> utt = random_utterance(rng, "de-DE")
>>> audio = synthesize(utt.sentences[0].text, utt.sentences[0].voice)   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import io
import random
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources

import numpy as np

SAMPLE_RATE = 16_000

#: Locale -> espeak-ng voice. The locales use the model's tag spelling (``<de-DE>``).
ESPEAK_VOICES: dict[str, str] = {
    "en-US": "en-us",
    "es-ES": "es",
    "de-DE": "de",
    "fr-FR": "fr-fr",
}
DEMO_LOCALES: tuple[str, ...] = tuple(ESPEAK_VOICES)

#: espeak-ng voice variants used for training and the sample corpus.
VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4")


@dataclass(frozen=True, slots=True)
class Voice:
    """How espeak-ng speaks one sentence."""

    locale: str
    variant: str = "m1"
    speed_wpm: int = 160
    pitch: int = 50
    #: Speak the text with another espeak-ng voice (its phonemes and prosody): a foreign accent,
    #: e.g. English text with ``accent="it"`` (Italian). The language tag stays ``locale``.
    accent: str | None = None

    @property
    def espeak_name(self) -> str:
        return f"{self.accent or ESPEAK_VOICES[self.locale]}+{self.variant}"


@dataclass(frozen=True, slots=True)
class Sentence:
    text: str
    voice: Voice

    @property
    def tagged(self) -> str:
        """The sentence the way the model writes it: text, then its language tag."""
        return f"{self.text} <{self.voice.locale}>"


@dataclass(frozen=True, slots=True)
class Utterance:
    """One clip: one or more sentences, possibly in different languages, with pauses between."""

    sentences: tuple[Sentence, ...]
    pauses_s: tuple[float, ...] = ()

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.sentences)

    @property
    def tagged(self) -> str:
        return " ".join(s.tagged for s in self.sentences)

    @property
    def locale(self) -> str:
        return self.sentences[0].voice.locale


class EspeakMissingError(RuntimeError):
    pass


@functools.cache
def _espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakMissingError(
            "espeak-ng is not installed; install it with `apt-get install espeak-ng` (`make setup` does this for you)"
        )
    return path


def check_voice(voice: str, variants: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` unless espeak-ng has ``voice`` and every one of ``variants`` (it would
    otherwise fail on the first clip, or fall back to its default variant without a word)."""

    def listed(*flags: str) -> set[str]:
        out = subprocess.run([_espeak_binary(), *flags], capture_output=True, text=True, check=True).stdout
        rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
        return {r[1] for r in rows if len(r) > 1} | {r[4].rsplit("/", 1)[-1] for r in rows if len(r) > 4}

    if voice not in listed("--voices"):
        raise ValueError(f"espeak-ng has no voice {voice!r}; `espeak-ng --voices` lists them (e.g. en-us, en-gb-x-rp)")
    unknown = sorted(set(variants) - listed("--voices=variant"))
    if unknown:
        raise ValueError(
            f"espeak-ng has no voice variant {', '.join(map(repr, unknown))}; "
            "`espeak-ng --voices=variant` lists them (e.g. m1, f5)"
        )


@functools.cache
def load_words(locale: str) -> tuple[str, ...]:
    """The demo vocabulary of a locale: frequent words, acoustically distinct under espeak-ng."""
    text = resources.files("demo").joinpath("words", f"{locale}.txt").read_text("utf-8")
    return tuple(w for w in text.split() if w)


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """Speak ``text`` with espeak-ng; returns float32 mono samples at 16 kHz."""
    import soundfile as sf
    import soxr

    cmd = [
        _espeak_binary(),
        "--stdout",
        "-v",
        voice.espeak_name,
        "-s",
        str(voice.speed_wpm),
        "-p",
        str(voice.pitch),
        text,
    ]
    wav = subprocess.run(cmd, capture_output=True, check=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=False)
    samples = _trim_silence(samples)
    return soxr.resample(samples, rate, SAMPLE_RATE).astype(np.float32)


def _trim_silence(x: np.ndarray, threshold: float = 1e-3, keep: int = 800) -> np.ndarray:
    voiced = np.flatnonzero(np.abs(x) > threshold)
    if voiced.size == 0:
        return x
    return x[max(0, voiced[0] - keep) : voiced[-1] + keep]


def render(utt: Utterance, lead_s: float = 0.15, tail_s: float = 0.25) -> np.ndarray:
    """Speak a whole utterance, with silence before, between and after its sentences."""
    parts = [np.zeros(int(lead_s * SAMPLE_RATE), np.float32)]
    for i, sentence in enumerate(utt.sentences):
        if i:
            parts.append(np.zeros(int(utt.pauses_s[i - 1] * SAMPLE_RATE), np.float32))
        parts.append(synthesize(sentence.text, sentence.voice))
    parts.append(np.zeros(int(tail_s * SAMPLE_RATE), np.float32))
    return np.concatenate(parts)


def random_voice(rng: random.Random, locale: str, variants: tuple[str, ...] = VARIANTS) -> Voice:
    return Voice(
        locale=locale,
        variant=rng.choice(variants),
        speed_wpm=rng.randint(135, 190),
        pitch=rng.randint(30, 70),
    )


def random_sentence_text(rng: random.Random, locale: str, min_words: int = 3, max_words: int = 7) -> str:
    words = rng.choices(load_words(locale), k=rng.randint(min_words, max_words))
    text = " ".join(words)
    end = "?" if rng.random() < 0.2 else "."
    return text[0].upper() + text[1:] + end


def random_utterance(
    rng: random.Random,
    locale: str,
    *,
    max_sentences: int = 1,
    switch_prob: float = 0.5,
    locales: tuple[str, ...] = DEMO_LOCALES,
) -> Utterance:
    """A clip of 1..max_sentences sentences; later sentences switch language with ``switch_prob``."""
    n = rng.randint(1, max_sentences)
    sentences, current = [], locale
    for i in range(n):
        if i and rng.random() < switch_prob:
            current = rng.choice([x for x in locales if x != current])
        sentences.append(Sentence(random_sentence_text(rng, current), random_voice(rng, current)))
    pauses = tuple(round(rng.uniform(0.3, 0.7), 2) for _ in range(n - 1))
    return Utterance(tuple(sentences), pauses)

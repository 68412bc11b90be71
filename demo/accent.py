"""Sets for the "new accent" loop, made with espeak-ng: speech the demo model has not heard.

* the **accent set**: English sentences of the demo vocabulary read by American espeak-ng voices
  the demo model never heard (``ACCENT_VARIANTS``: variants m6, m8 and f5; it learned from
  m1-m5, m7 and f1-f4): 33 % WER before fine-tuning against 5 % on its own voices. The language
  tag stays ``<en-US>``. Other accents work the same way: ``voice`` (``en-gb-x-rp``, British;
  ``en-gb-scotland``, ``en-029``; another language's voice such as ``de``: English with German
  letter-to-sound rules) and ``speed`` (the demo heard 135-190 words per minute; 230-290 gives
  47 % WER). A voice that says the same words with other vowels under the same ``<en-US>`` tag
  collides with the original en-US in a model as small as the demo's: British RP (38 % WER)
  was learned (36 % lower) only with original en-US 13-21 % worse (21 % on 500 fresh clips), whatever
  the anchor, merge or replay share; new voices of the same accent leave it as it was;
* the **original set**: clips like the demo model's training set (four locales, code-switching),
  for checking that no original language gets worse;
* the **replay set**: more clips of the original kind, mixed into fine-tuning so that the model
  keeps what it knew (a common guard against forgetting; a real deployment replays a sample of
  the base model's own training data).

Each set is written as 16 kHz FLAC files plus a NeMo manifest (``audio_filepath`` relative to
the manifest, ``duration``, ``text`` with the tags the way the model writes them, ``target_lang``,
and ``text_plain``). Everything is deterministic for a seed.
"""

from __future__ import annotations

import random
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from demo import speech
from records.manifest import ManifestEntry, write_manifest

#: The accent set's espeak-ng voice, words per minute and voice variants (``speech.VARIANTS``
#: are the ones the demo model was trained on).
ACCENT_VOICE = "en-us"
ACCENT_SPEED = (135, 190)
ACCENT_VARIANTS = ("m6", "m8", "f5")
ACCENT_SEED, HELDOUT_SEED, ORIGINAL_SEED, REPLAY_SEED = 501, 502, 503, 504
#: The manifest key of a clip's reference without tags.
PLAIN = "text_plain"


def accent_utterances(
    seed: int,
    count: int,
    voice: str = ACCENT_VOICE,
    speed: tuple[int, int] = ACCENT_SPEED,
    variants: tuple[str, ...] = ACCENT_VARIANTS,
) -> list[speech.Utterance]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        variant, wpm, pitch = rng.choice(variants), rng.randint(*speed), rng.randint(30, 70)
        v = speech.Voice("en-US", variant, wpm, pitch, accent=voice)
        out.append(speech.Utterance((speech.Sentence(speech.random_sentence_text(rng, "en-US"), v),)))
    return out


def original_utterances(seed: int, count: int) -> list[speech.Utterance]:
    rng = random.Random(seed)
    out = []
    for k in range(count):
        locale = speech.DEMO_LOCALES[k % len(speech.DEMO_LOCALES)]
        out.append(speech.random_utterance(rng, locale, max_sentences=1 if rng.random() < 0.7 else 2))
    return out


def _render(utt: speech.Utterance) -> np.ndarray:
    return speech.render(utt)


def write_set(utts: list[speech.Utterance], folder: Path, *, processes: int = 2) -> Path:
    """FLAC files and ``manifest.jsonl`` in ``folder``; returns the manifest's path."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    with Pool(processes) as pool:
        audios = pool.map(_render, utts, chunksize=8)
    entries = []
    for k, (utt, audio) in enumerate(zip(utts, audios, strict=True)):
        name = f"{k:05d}.flac"
        sf.write(folder / name, audio, speech.SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        duration = round(len(audio) / speech.SAMPLE_RATE, 3)
        entries.append(
            ManifestEntry(name, duration=duration, text=utt.tagged, target_lang=utt.locale, extra={PLAIN: utt.text})
        )
    manifest = folder / "manifest.jsonl"
    manifest.write_bytes(write_manifest(entries))
    return manifest


def plain_text(entry: ManifestEntry) -> str:
    """The reference of a set's clip without tags (what a reviewer would type)."""
    return str(entry.extra[PLAIN])

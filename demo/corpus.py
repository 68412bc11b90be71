"""Build the sample corpus shipped in ``demo/corpus/`` (for the demo and the tests).

    python -m demo.corpus            # rewrites demo/corpus/ from its seed

What it holds, all made with espeak-ng from a fixed seed (voices, sentences and pauses differ
from the demo model's training set):

* ``short/``: 24 clips per demo locale (one to three sentences, some switching language),
  16 kHz mono FLAC;
* ``long/``: three recordings of 70-90 s, sentences separated by 0.6-2.5 s pauses, one of them
  switching language every few sentences;
* ``broken/``: files that must be rejected cleanly (empty, truncated, not audio, NaN samples,
  zero frames, random bytes named .mp3);
* ``manifest.jsonl``: a NeMo manifest of the short and long clips (paths relative to the
  manifest) with the reference ``text`` (no tags), ``text_tagged`` (tags the way the model
  writes them), ``lang`` and, for long recordings, ``sentences`` with their times;
* ``broken.jsonl``: each broken file and the problem a decoder must report.
"""

from __future__ import annotations

import argparse
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np

from demo import speech
from records.manifest import ManifestEntry, read_manifest, write_manifest

CORPUS_DIR = Path(__file__).parent / "corpus"
SEED = 20261126
SHORT_PER_LOCALE = 24


def _write_flac(path: Path, audio: np.ndarray) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, speech.SAMPLE_RATE, format="FLAC", subtype="PCM_16")


def _short_clips(rng: random.Random, out: Path) -> list[ManifestEntry]:
    rows = []
    for locale in speech.DEMO_LOCALES:
        for k in range(SHORT_PER_LOCALE):
            max_sentences = 1 if k % 3 else rng.choice([2, 3])
            utt = speech.random_utterance(rng, locale, max_sentences=max_sentences, switch_prob=0.5)
            audio = speech.render(utt)
            name = f"short/{locale}-{k:02d}.flac"
            _write_flac(out / name, audio)
            rows.append(
                ManifestEntry(
                    name,
                    duration=round(len(audio) / speech.SAMPLE_RATE, 3),
                    text=utt.text,
                    text_tagged=utt.tagged,
                    lang=locale,
                    extra={"langs": [s.voice.locale for s in utt.sentences]},
                )
            )
    return rows


def _long_recording(rng: random.Random, locales: list[str], seconds: float, name: str, out: Path) -> ManifestEntry:
    parts = [np.zeros(int(0.5 * speech.SAMPLE_RATE), np.float32)]
    t = 0.5
    sentences: list[dict[str, Any]] = []
    locale = locales[0]
    while t < seconds:
        if len(locales) > 1 and sentences and len(sentences) % 3 == 0:
            locale = locales[(locales.index(locale) + 1) % len(locales)]
        text = speech.random_sentence_text(rng, locale)
        audio = speech.synthesize(text, speech.random_voice(rng, locale))
        sentences.append(
            {
                "text": text,
                "lang": locale,
                "start_s": round(t, 3),
                "end_s": round(t + len(audio) / speech.SAMPLE_RATE, 3),
            }
        )
        pause = rng.uniform(0.6, 2.5)
        parts += [audio, np.zeros(int(pause * speech.SAMPLE_RATE), np.float32)]
        t += len(audio) / speech.SAMPLE_RATE + int(pause * speech.SAMPLE_RATE) / speech.SAMPLE_RATE
    audio = np.concatenate(parts)
    _write_flac(out / name, audio)
    return ManifestEntry(
        name,
        duration=round(len(audio) / speech.SAMPLE_RATE, 3),
        text=" ".join(s["text"] for s in sentences),
        text_tagged=" ".join(f"{s['text']} <{s['lang']}>" for s in sentences),
        lang=locales[0] if len(locales) == 1 else "auto",
        extra={"langs": sorted({s["lang"] for s in sentences}), "sentences": sentences},
    )


def _broken_files(out: Path) -> list[ManifestEntry]:
    import soundfile as sf

    d = out / "broken"
    d.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(name: str, problem: str) -> None:
        rows.append(ManifestEntry(f"broken/{name}", extra={"problem": problem}))

    (d / "empty.wav").write_bytes(b"")
    add("empty.wav", "empty")
    tone = (0.3 * np.sin(np.arange(32000) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    sf.write(d / "full.wav", tone, 16000, subtype="PCM_16")
    data = (d / "full.wav").read_bytes()
    (d / "truncated.wav").write_bytes(data[: len(data) // 3])
    (d / "full.wav").unlink()
    add("truncated.wav", "truncated")
    (d / "not_audio.wav").write_text("this is a text file, not a recording\n" * 20)
    add("not_audio.wav", "not audio")
    (d / "random.mp3").write_bytes(random.Random(7).randbytes(20000))
    add("random.mp3", "not audio")
    nan = tone.copy()
    nan[1000:1100] = np.nan
    sf.write(d / "nan.wav", nan, 16000, subtype="FLOAT")
    add("nan.wav", "NaN")
    # a valid RIFF/WAVE header that declares zero frames
    header = b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    (d / "zero_frames.wav").write_bytes(header + b"data" + struct.pack("<I", 0))
    add("zero_frames.wav", "no samples")
    return rows


def build(out: Path = CORPUS_DIR) -> None:
    rng = random.Random(SEED)
    rows = _short_clips(rng, out)
    rows.append(_long_recording(rng, ["en-US"], 75, "long/en-US-talk.flac", out))
    rows.append(_long_recording(rng, ["de-DE"], 70, "long/de-DE-talk.flac", out))
    rows.append(_long_recording(rng, ["es-ES", "fr-FR", "en-US"], 90, "long/mixed-talk.flac", out))
    (out / "manifest.jsonl").write_bytes(write_manifest(rows))
    broken = _broken_files(out)
    (out / "broken.jsonl").write_bytes(write_manifest(broken))
    print(f"wrote {len(rows)} clips and {len(broken)} broken files to {out}")


def load_manifest(path: Path = CORPUS_DIR / "manifest.jsonl") -> list[ManifestEntry]:
    """The corpus manifest with ``audio_filepath`` made absolute."""
    return read_manifest(path.read_bytes(), base=str(path.parent.resolve()), name=str(path))


def sentence_langs(entry: ManifestEntry) -> list[str]:
    """The language of each sentence of a corpus clip, in order."""
    if "sentences" in entry.extra:
        return [s["lang"] for s in entry.extra["sentences"]]
    return list(entry.extra["langs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CORPUS_DIR)
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()

"""Build the demo vocabulary (demo/words/<locale>.txt) from wordfreq's frequency lists.

Keeps frequent alphabetic words and drops every word that espeak-ng pronounces like another
kept word of the same language (``est``/``et``, ``four``/``for``): the demo model hears random
word sequences with no language model to lean on, so homophones would put a floor under its WER.

    python -m demo.make_words --per-locale 100
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

from demo.speech import ESPEAK_VOICES

WORDFREQ_LANG = {"en-US": "en", "es-ES": "es", "de-DE": "de", "fr-FR": "fr"}


def phonemes(word: str, voice: str) -> str:
    out = subprocess.run(["espeak-ng", "-q", "-x", "-v", voice, word], capture_output=True, text=True)
    return re.sub(r"[\s'_,:]", "", out.stdout)


def build(locale: str, per_locale: int) -> list[str]:
    from wordfreq import top_n_list

    kept: list[str] = []
    seen: set[str] = set()
    for word in top_n_list(WORDFREQ_LANG[locale], 4 * per_locale):
        if not re.fullmatch(r"[^\W\d_]{2,}", word):
            continue
        key = phonemes(word, ESPEAK_VOICES[locale])
        if key in seen:
            continue
        seen.add(key)
        kept.append(word)
        if len(kept) == per_locale:
            break
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-locale", type=int, default=100)
    args = parser.parse_args()
    out = Path(__file__).parent / "words"
    out.mkdir(exist_ok=True)
    for locale in ESPEAK_VOICES:
        words = build(locale, args.per_locale)
        (out / f"{locale}.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
        print(locale, len(words))


if __name__ == "__main__":
    main()

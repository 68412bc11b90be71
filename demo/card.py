"""Measure the demo model on its held-out set and write its card.

    python -m demo.card --model build/demo-model/best.nemo --install

The held-out set is rebuilt from its seed (``demo.train.HELDOUT_SEED``): 400 clips whose
sentences were never trained on, one to three sentences each, a quarter of them switching
language. Scoring, in ``auto`` mode:

* WER: word errors over reference words after lower-casing and removing punctuation and tags;
* sentence-language accuracy: the k-th tag the model wrote equals the k-th sentence's language
  (a missing tag counts as wrong).

``--install`` copies the model to ``demo/demo-model.nemo`` and writes ``demo-model.json``
(figures) beside it; MODEL_CARD.md quotes those figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from demo import DEMO_DIR, MODEL_PATH

CARD_JSON = DEMO_DIR / "demo-model.json"
#: Targets the card must meet (auto mode, held-out set).
TARGET_WER = 0.15
TARGET_LANG_ACC = 0.95


def heldout_set(count: int = 400) -> tuple[list[np.ndarray], list[Any]]:
    from demo import speech
    from demo.train import heldout_utterances

    utts = heldout_utterances(count)
    return [speech.render(u) for u in utts], utts


def score(results: list[Any], utts: list[Any]) -> dict[str, float]:
    from records.text import word_errors

    errors = words = tags_ok = tags = 0
    for res, utt in zip(results, utts, strict=True):
        e, n = word_errors(utt.text, res.text)
        errors, words = errors + e, words + n
        got = [s.lang for s in res.sentences]
        want = [s.voice.locale for s in utt.sentences]
        tags += len(want)
        tags_ok += sum(1 for k, lang in enumerate(want) if k < len(got) and got[k] == lang)
    return {"wer": errors / max(words, 1), "lang_acc": tags_ok / max(tags, 1), "words": words, "sentences": tags}


def evaluate(engine: Any, count: int = 400, att_context: tuple[int, int] | None = None) -> dict[str, Any]:
    from asr.engine import TranscribeOptions

    audios, utts = heldout_set(count)
    t0 = time.perf_counter()
    results = engine.transcribe(audios, options=TranscribeOptions(lang="auto", att_context=att_context))
    wall = time.perf_counter() - t0
    metrics: dict[str, Any] = score(results, utts)
    metrics.update(
        clips=count,
        audio_s=round(sum(len(a) for a in audios) / 16000, 1),
        att_context=list(results[0].att_context),
        rtfx_cpu=round(sum(len(a) for a in audios) / 16000 / wall, 1),
    )
    return metrics


def main() -> None:
    from asr.engine import Transcriber

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--install", action="store_true", help="copy the model into the package and write its figures")
    parser.add_argument("--train-log", type=Path, default=None, help="the trainer's evals.jsonl, for the card")
    args = parser.parse_args()
    engine = Transcriber.load(str(args.model), device="cpu")
    per_mode = {}
    for att in engine.info.att_context_sizes:
        # the default mode on the whole held-out set (the card's headline), the others on a quarter
        count = 400 if att == engine.info.default_att_context else 100
        per_mode[f"{att[0]},{att[1]}"] = evaluate(engine, count=count, att_context=att)
        print(f"att_context {att}: {per_mode[f'{att[0]},{att[1]}']}", flush=True)
    default = per_mode[f"{engine.info.default_att_context[0]},{engine.info.default_att_context[1]}"]
    card = {
        "model_id": f"earmark-demo@{engine.info.sha256[:12]}",
        "sha256": engine.info.sha256,
        "params": sum(p.numel() for p in engine.model.parameters()),
        "locales": list(engine.info.locales),
        "heldout": {"seed_module": "demo.train.HELDOUT_SEED", **default},
        "per_latency_mode": per_mode,
        "targets": {"wer_max": TARGET_WER, "lang_acc_min": TARGET_LANG_ACC},
        "meets_targets": default["wer"] <= TARGET_WER and default["lang_acc"] >= TARGET_LANG_ACC,
    }
    if args.train_log and args.train_log.exists():
        evals = [json.loads(line) for line in args.train_log.read_text().splitlines()]
        card["training"] = {"steps": evals[-1]["step"], "minutes": evals[-1]["minutes"]}
    print(json.dumps(card, indent=2))
    if args.install:
        shutil.copyfile(args.model, MODEL_PATH)
        CARD_JSON.write_text(json.dumps(card, indent=2) + "\n")
        print(f"installed {MODEL_PATH} and {CARD_JSON}")


if __name__ == "__main__":
    main()

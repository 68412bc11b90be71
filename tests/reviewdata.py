"""A small review project over the real sample corpus, for the web app tests."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow.parquet as pq

from labeling.ingest import route_table
from labeling.policy import Policy
from labeling.queue import ReviewQueue
from records.pseudo_labels import PseudoLabel, to_table

XSS = 'Hola <script>window.__pwned = 1</script> amigo <img src=x onerror="window.__pwned = 2">.'


def corpus_rows(corpus: list[dict], n: int = 8) -> list[dict]:
    """Pseudo-label rows for the first ``n`` short corpus clips, all unsure (so all queued);
    the first carries an XSS payload as its text and is the least confident."""
    rows = []
    shorts = [r for r in corpus if "sentences" not in r][:n]
    for i, ref in enumerate(shorts):
        text = XSS if i == 0 else ref["text"]
        words = text.split()
        step = ref["duration"] / max(1, len(words))
        lang = ref["langs"][0]
        rows.append(
            {
                "clip_id": f"c{i:04d}",
                "item_id": f"c{i:04d}",
                "source_uri": ref["audio_filepath"],
                "source_hash": None,
                "offset_s": 0.0,
                "duration_s": ref["duration"],
                "segment_index": 0,
                "segment_count": 1,
                "status": "ok",
                "error": None,
                "text": text,
                "text_raw": f"{text} <{lang}>",
                "lang_requested": "auto",
                "lang_detected": lang,
                "sentences": [
                    {"text": text, "lang": lang, "start_s": 0.0, "end_s": ref["duration"], "confidence": 0.3}
                ],
                "words": [
                    {"word": w, "start_s": k * step, "end_s": (k + 1) * step, "confidence": 0.1 if k == 1 else 0.9}
                    for k, w in enumerate(words)
                ],
                "confidence": 0.05 + i / 100,
                "ref_text": ref["text"],
                "model_id": "demo@test",
                "att_context": [56, 13],
                "run_id": "run-1",
                "created_at": dt.datetime(2026, 11, 26, tzinfo=dt.UTC),
            }  # fmt: skip
        )
    return rows


def make_project(folder: Path, corpus: list[dict], n: int = 8) -> tuple[str, ReviewQueue]:
    url = f"sqlite:///{folder / 'review.db'}"
    queue = ReviewQueue.connect(url)
    labels = folder / "labels.parquet"
    pq.write_table(to_table(PseudoLabel.from_row(r) for r in corpus_rows(corpus, n)), labels)
    route_table(queue, "demo", str(labels), Policy(confidence={"default": 0.9}))
    return url, queue

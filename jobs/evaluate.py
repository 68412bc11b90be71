"""``earmark evaluate``: how good a model is on a manifest with references.

    earmark evaluate --model demo --manifest heldout.jsonl --out reports/demo [--att-context 56,3]

The clips are transcribed by the batch job (``earmark transcribe``, so the same engine, VAD and
latency mode) into ``OUT/labels``; then, per language and overall:

* WER and CER, **raw** (case and punctuation kept, language tags removed) and **normalized**
  (lower case, no punctuation);
* sentence-language accuracy: the model's per-sentence tags against the reference's, position by
  position (references carry tags as the model writes them, ``text_tagged``, or one
  ``target_lang``/``lang`` for the whole clip);
* confidence quality: AUROC of the utterance confidence for "this clip has an error" (1.0 = the
  confidence ranks every wrong clip under every right one; 0.5 = no better than chance), and a
  reliability table of word confidence against the share of words that were right.

Writes ``OUT/metrics.json`` and a self-contained ``OUT/report.html`` (plots by matplotlib,
embedded as PNG).
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asr.text import TAG_RE, split_tagged, strip_tags
from cluster import storage
from jobs.clips import clip_id, resolve_audio_path

PUNCT_RE = re.compile(r"[^\w\s']")
BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0001)


@dataclass
class Reference:
    text: str
    langs: list[str]
    lang: str


@dataclass
class Tally:
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    clips: int = 0
    tags: int = 0
    tags_ok: int = 0

    def add(self, kind: str, errors: int, total: int) -> None:
        self.errors[f"{kind}_err"] += errors
        self.errors[f"{kind}_n"] += total

    def rate(self, kind: str) -> float | None:
        n = self.errors[f"{kind}_n"]
        return self.errors[f"{kind}_err"] / n if n else None


def normalize(text: str) -> str:
    return " ".join(PUNCT_RE.sub(" ", text.lower()).split())


def read_references(manifest: str, options: storage.StorageOptions | None = None) -> dict[str, Reference]:
    """item id -> reference (text without tags, the language of each sentence, the main language)."""
    base = manifest.rsplit("/", 1)[0] if storage.is_remote(manifest) else str(Path(manifest).resolve().parent)
    refs = {}
    for line in storage.read_bytes(manifest, options).decode("utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        tagged = row.get("text_tagged") or row.get("text") or ""
        whole = row.get("target_lang") or (row.get("lang") if row.get("lang") not in (None, "auto") else None)
        if TAG_RE.search(tagged):
            sentences = split_tagged(tagged)
            langs = [s.lang or whole or "-" for s in sentences]
        else:
            langs = [whole] if whole else []
        source = resolve_audio_path(str(row["audio_filepath"]), base)
        duration = row.get("duration")
        key = clip_id(source, float(row.get("offset") or 0.0), float(duration) if duration is not None else None)
        main = whole or (max(set(langs), key=langs.count) if langs else "-")
        refs[key] = Reference(strip_tags(tagged).strip(), langs, main)
    return refs


def score(rows: list[dict[str, Any]], refs: dict[str, Reference]) -> dict[str, Any]:
    """Metrics of pseudo-label ``rows`` (several segments per item allowed) against ``refs``."""
    import jiwer

    by_item: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_item[row["item_id"]].append(row)
    tallies: dict[str, Tally] = defaultdict(Tally)
    utterances: list[tuple[float, bool]] = []
    words: list[tuple[float, bool]] = []
    failed = 0
    for item, segments in by_item.items():
        ref = refs.get(item)
        if ref is None:
            continue
        segments.sort(key=lambda r: r["segment_index"])
        if any(r["status"] != "ok" for r in segments):
            failed += 1
            continue
        hyp_raw = " ".join((r["text"] or "").strip() for r in segments).strip()
        hyp_langs = [s["lang"] for r in segments for s in r["sentences"]]
        for key in (ref.lang, "all"):
            t = tallies[key]
            t.clips += 1
            for kind, a, b in (("wer_raw", ref.text, hyp_raw), ("wer", normalize(ref.text), normalize(hyp_raw))):
                e, n = _errors(jiwer.process_words, a, b)
                t.add(kind, e, n)
            for kind, a, b in (("cer_raw", ref.text, hyp_raw), ("cer", normalize(ref.text), normalize(hyp_raw))):
                e, n = _errors(jiwer.process_characters, a, b)
                t.add(kind, e, n)
            if ref.langs:
                t.tags += len(ref.langs)
                t.tags_ok += sum(1 for k, lang in enumerate(ref.langs) if k < len(hyp_langs) and hyp_langs[k] == lang)
        e, _ = _errors(jiwer.process_words, normalize(ref.text), normalize(hyp_raw))
        confs = [r["confidence"] for r in segments if r["confidence"] is not None]
        if confs:
            utterances.append((sum(confs) / len(confs), e > 0))
        words += _word_hits(normalize(ref.text), [w for r in segments for w in r["words"]])
    return {
        "clips_scored": tallies["all"].clips,
        "clips_failed": failed,
        "languages": {
            lang: {
                "clips": t.clips,
                "wer": t.rate("wer"),
                "wer_raw": t.rate("wer_raw"),
                "cer": t.rate("cer"),
                "cer_raw": t.rate("cer_raw"),
                "sentence_language_accuracy": t.tags_ok / t.tags if t.tags else None,
            }
            for lang, t in sorted(tallies.items())
        },
        "confidence": {
            "auroc_error": _auroc(utterances),
            "reliability": _reliability(words),
            "utterances": len(utterances),
        },
    }


def _errors(process: Any, ref: str, hyp: str) -> tuple[int, int]:
    """(edit operations, reference length) in words (jiwer.process_words) or characters."""
    words = process.__name__ == "process_words"
    size = (lambda t: len(t.split())) if words else len
    if not ref:
        return size(hyp), 0
    if not hyp:
        return size(ref), size(ref)
    out = process(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, out.hits + out.substitutions + out.deletions


def _word_hits(ref_norm: str, words: list[dict]) -> list[tuple[float, bool]]:
    """(confidence, was the word right) for each hypothesis word, from a word alignment."""
    import jiwer

    hyp = [(normalize(w["word"]), w["confidence"]) for w in words]
    hyp = [(w, c) for w, c in hyp if w]
    if not hyp or not ref_norm:
        return [(c, False) for _, c in hyp]
    out = jiwer.process_words(ref_norm, " ".join(w for w, _ in hyp))
    right = [False] * len(hyp)
    for chunk in out.alignments[0]:
        if chunk.type == "equal":
            for k in range(chunk.hyp_start_idx, chunk.hyp_end_idx):
                right[k] = True
    flat = " ".join(w for w, _ in hyp).split()
    if len(flat) != len(hyp):  # a "word" that normalizes to two: give up on alignment for this clip
        return []
    return [(c, ok) for (_, c), ok in zip(hyp, right, strict=True)]


def _auroc(points: list[tuple[float, bool]]) -> float | None:
    from sklearn.metrics import roc_auc_score

    labels = [err for _, err in points]
    if len(set(labels)) < 2:
        return None
    return float(roc_auc_score(labels, [-c for c, _ in points]))  # low confidence should mean "has an error"


def _reliability(points: list[tuple[float, bool]]) -> list[dict[str, Any]]:
    out = []
    for lo, hi in zip(BINS, BINS[1:], strict=False):
        inside = [(c, ok) for c, ok in points if lo <= c < hi]
        out.append(
            {
                "bin": f"{lo:.1f}-{min(hi, 1.0):.1f}",
                "words": len(inside),
                "mean_confidence": sum(c for c, _ in inside) / len(inside) if inside else None,
                "accuracy": sum(ok for _, ok in inside) / len(inside) if inside else None,
            }
        )
    return out


def html_report(metrics: dict[str, Any], rows: list[dict[str, Any]], *, title: str) -> str:
    """One HTML file: a metrics table and three matplotlib plots embedded as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig: Any) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode()

    langs = {k: v for k, v in metrics["languages"].items() if k != "all"}
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(list(langs), [100 * (v["wer"] or 0) for v in langs.values()], color="#4c72b0")
    ax.set_ylabel("WER (%)")
    ax.set_title("WER per language (normalized)")
    wer_png = png(fig)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist([r["confidence"] for r in rows if r["confidence"] is not None], bins=20, range=(0, 1), color="#55a868")
    ax.set_xlabel("utterance confidence")
    ax.set_ylabel("clips")
    ax.set_title("Confidence histogram")
    hist_png = png(fig)
    rel = [b for b in metrics["confidence"]["reliability"] if b["words"]]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "--", color="#999", label="perfect calibration")
    ax.plot([b["mean_confidence"] for b in rel], [b["accuracy"] for b in rel], "o-", color="#c44e52", label="model")
    ax.set_xlabel("word confidence")
    ax.set_ylabel("share of words right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title("Reliability")
    rel_png = png(fig)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    body = "".join(
        f"<tr><td>{lang}</td><td>{v['clips']}</td><td>{pct(v['wer'])}</td><td>{pct(v['wer_raw'])}</td>"
        f"<td>{pct(v['cer'])}</td><td>{pct(v['cer_raw'])}</td><td>{pct(v['sentence_language_accuracy'])}</td></tr>"
        for lang, v in metrics["languages"].items()
    )
    auroc = metrics["confidence"]["auroc_error"]
    from html import escape

    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font:15px system-ui,sans-serif;max-width:900px;margin:2rem auto}}td,th{{border:1px solid #ccc;padding:.2rem .6rem}}
table{{border-collapse:collapse}}img{{max-width:100%}}</style></head><body>
<h1>{escape(title)}</h1>
<p>model {escape(str(metrics.get("model_id")))}, att_context {escape(str(metrics.get("att_context")))},
manifest {escape(str(metrics.get("manifest")))}; {metrics["clips_scored"]} clips scored, {metrics["clips_failed"]} failed.</p>
<table><tr><th>language</th><th>clips</th><th>WER</th><th>WER raw</th><th>CER</th><th>CER raw</th><th>sentence-language accuracy</th></tr>{body}</table>
<p>Confidence AUROC for "clip has an error": {"-" if auroc is None else f"{auroc:.3f}"}</p>
<img alt="WER per language" src="data:image/png;base64,{wer_png}">
<img alt="confidence histogram" src="data:image/png;base64,{hist_png}">
<img alt="reliability curve" src="data:image/png;base64,{rel_png}">
</body></html>"""


def score_parts(
    labels: str, manifests: list[str], options: storage.StorageOptions | None = None
) -> dict[str, dict[str, Any]]:
    """Manifest -> :func:`score` of its clips within the labels of an evaluation of their union
    (the labels are read once)."""
    import pyarrow.dataset as pads

    fs, root = storage.pyarrow_filesystem(labels, options)
    rows = pads.dataset(root, filesystem=fs, format="parquet").to_table().to_pylist()
    return {m: score(rows, read_references(m, options)) for m in manifests}


def run_evaluate(
    *, manifest: str, out: str, settings: Any, address: str | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Transcribe ``manifest`` with the batch job into ``OUT/labels``, score it, write the report."""
    import pyarrow.dataset as pads

    from jobs.transcribe import TranscribeRequest, run_transcribe

    labels = f"{out.rstrip('/')}/labels"
    summary = run_transcribe(
        TranscribeRequest(input=manifest, out=labels, settings=settings, address=address, quiet=quiet)
    )
    fs, root = storage.pyarrow_filesystem(labels, settings.storage)
    rows = pads.dataset(root, filesystem=fs, format="parquet").to_table().to_pylist()
    metrics = score(rows, read_references(manifest, settings.storage))
    metrics |= {
        "manifest": manifest,
        "model_id": (summary["model_ids"] or [None])[0],
        "att_context": rows[0]["att_context"] if rows else None,
        "labels": labels,
    }
    storage.write_bytes(f"{out.rstrip('/')}/metrics.json", json.dumps(metrics, indent=2).encode(), settings.storage)
    title = f"earmark evaluation: {Path(manifest).name}"
    storage.write_bytes(
        f"{out.rstrip('/')}/report.html", html_report(metrics, rows, title=title).encode(), settings.storage
    )
    return metrics

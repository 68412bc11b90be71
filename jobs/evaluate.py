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
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cluster import storage
from jobs.stages import JobSettings
from records.clips import clip_id
from records.manifest import manifest_base, read_manifest
from records.pseudo_labels import PseudoLabel, Word, from_table
from records.text import TAG_RE, char_errors, matched_words, normalize, split_tagged, strip_tags, word_errors

BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0001)


@dataclass(frozen=True, slots=True)
class Reference:
    text: str
    langs: list[str]
    lang: str


@dataclass(frozen=True, slots=True)
class LanguageScores:
    clips: int
    wer: float | None
    wer_raw: float | None
    cer: float | None
    cer_raw: float | None
    sentence_language_accuracy: float | None


@dataclass(frozen=True, slots=True)
class ReliabilityBin:
    bin: str
    words: int
    mean_confidence: float | None
    accuracy: float | None


@dataclass(frozen=True, slots=True)
class ConfidenceQuality:
    #: AUROC of the utterance confidence for "this clip has an error" (None: all clips alike).
    auroc_error: float | None
    reliability: list[ReliabilityBin]
    utterances: int


@dataclass(frozen=True, slots=True)
class Evaluation:
    """``OUT/metrics.json`` of ``earmark evaluate``; the card of a fine-tuned model keeps one per
    dev set. ``languages`` has one entry per language and ``all``."""

    clips_scored: int
    clips_failed: int
    languages: dict[str, LanguageScores]
    confidence: ConfidenceQuality
    manifest: str | None = None
    model_id: str | None = None
    att_context: list[int] | None = None
    #: The pseudo-labels the figures were computed from.
    labels: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Tally:
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    clips: int = 0
    tags: int = 0
    tags_ok: int = 0

    def add(self, kind: str, counts: tuple[int, int]) -> None:
        self.errors[f"{kind}_err"] += counts[0]
        self.errors[f"{kind}_n"] += counts[1]

    def rate(self, kind: str) -> float | None:
        n = self.errors[f"{kind}_n"]
        return self.errors[f"{kind}_err"] / n if n else None

    def scores(self) -> LanguageScores:
        return LanguageScores(
            clips=self.clips,
            wer=self.rate("wer"),
            wer_raw=self.rate("wer_raw"),
            cer=self.rate("cer"),
            cer_raw=self.rate("cer_raw"),
            sentence_language_accuracy=self.tags_ok / self.tags if self.tags else None,
        )


def read_references(manifest: str, options: storage.StorageOptions | None = None) -> dict[str, Reference]:
    """item id -> reference (text without tags, the language of each sentence, the main language)."""
    refs = {}
    entries = read_manifest(storage.read_bytes(manifest, options), base=manifest_base(manifest), name=manifest)
    for entry in entries:
        tagged = entry.text_tagged or entry.text or ""
        whole = entry.locale
        if TAG_RE.search(tagged):
            langs = [s.lang or whole or "-" for s in split_tagged(tagged)]
        else:
            langs = [whole] if whole else []
        key = clip_id(entry.audio_filepath, entry.start_s, entry.duration)
        main = whole or (max(set(langs), key=langs.count) if langs else "-")
        refs[key] = Reference(strip_tags(tagged).strip(), langs, main)
    return refs


def score(labels: list[PseudoLabel], refs: dict[str, Reference]) -> Evaluation:
    """Metrics of pseudo-labels (several segments per item allowed) against ``refs``."""
    by_item: dict[str, list[PseudoLabel]] = defaultdict(list)
    for label in labels:
        by_item[label.item_id].append(label)
    tallies: dict[str, _Tally] = defaultdict(_Tally)
    utterances: list[tuple[float, bool]] = []
    words: list[tuple[float, bool]] = []
    failed = 0
    for item, segments in by_item.items():
        ref = refs.get(item)
        if ref is None:
            continue
        segments.sort(key=lambda r: r.segment_index)
        if any(not r.ok for r in segments):
            failed += 1
            continue
        hyp = " ".join((r.text or "").strip() for r in segments).strip()
        hyp_langs = [lang for r in segments for lang in r.sentence_langs]
        wer = word_errors(ref.text, hyp)
        for key in (ref.lang, "all"):
            t = tallies[key]
            t.clips += 1
            t.add("wer", wer)
            t.add("wer_raw", word_errors(ref.text, hyp, normalized=False))
            t.add("cer", char_errors(ref.text, hyp))
            t.add("cer_raw", char_errors(ref.text, hyp, normalized=False))
            if ref.langs:
                t.tags += len(ref.langs)
                t.tags_ok += sum(1 for k, lang in enumerate(ref.langs) if k < len(hyp_langs) and hyp_langs[k] == lang)
        confs = [r.confidence for r in segments if r.confidence is not None]
        if confs:
            utterances.append((sum(confs) / len(confs), wer[0] > 0))
        words += _word_hits(ref.text, [w for r in segments for w in r.words])
    return Evaluation(
        clips_scored=tallies["all"].clips,
        clips_failed=failed,
        languages={lang: t.scores() for lang, t in sorted(tallies.items())},
        confidence=ConfidenceQuality(_auroc(utterances), _reliability(words), len(utterances)),
    )


def _word_hits(reference: str, words: list[Word]) -> list[tuple[float, bool]]:
    """(confidence, was the word right) for each hypothesis word that has letters, from a word
    alignment; none when the clip's words do not align one to one."""
    right = matched_words(reference, [w.word for w in words])
    if right is None:
        return []
    return [(w.confidence, ok) for w, ok in zip(words, right, strict=True) if normalize(w.word)]


def _auroc(points: list[tuple[float, bool]]) -> float | None:
    from sklearn.metrics import roc_auc_score

    labels = [err for _, err in points]
    if len(set(labels)) < 2:
        return None
    return float(roc_auc_score(labels, [-c for c, _ in points]))  # low confidence should mean "has an error"


def _reliability(points: list[tuple[float, bool]]) -> list[ReliabilityBin]:
    out = []
    for lo, hi in zip(BINS, BINS[1:], strict=False):
        inside = [(c, ok) for c, ok in points if lo <= c < hi]
        out.append(
            ReliabilityBin(
                bin=f"{lo:.1f}-{min(hi, 1.0):.1f}",
                words=len(inside),
                mean_confidence=sum(c for c, _ in inside) / len(inside) if inside else None,
                accuracy=sum(ok for _, ok in inside) / len(inside) if inside else None,
            )
        )
    return out


def html_report(metrics: Evaluation, labels: list[PseudoLabel], *, title: str) -> str:
    """One HTML file: a metrics table and three matplotlib plots embedded as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from html import escape

    import matplotlib.pyplot as plt

    def png(fig: Any) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode()

    langs = {k: v for k, v in metrics.languages.items() if k != "all"}
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(list(langs), [100 * (v.wer or 0) for v in langs.values()], color="#4c72b0")
    ax.set_ylabel("WER (%)")
    ax.set_title("WER per language (normalized)")
    wer_png = png(fig)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist([r.confidence for r in labels if r.confidence is not None], bins=20, range=(0, 1), color="#55a868")
    ax.set_xlabel("utterance confidence")
    ax.set_ylabel("clips")
    ax.set_title("Confidence histogram")
    hist_png = png(fig)
    rel = [(b.mean_confidence, b.accuracy) for b in metrics.confidence.reliability if b.words]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "--", color="#999", label="perfect calibration")
    ax.plot([c or 0.0 for c, _ in rel], [a or 0.0 for _, a in rel], "o-", color="#c44e52", label="model")
    ax.set_xlabel("word confidence")
    ax.set_ylabel("share of words right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title("Reliability")
    rel_png = png(fig)

    body = "".join(
        f"<tr><td>{escape(lang)}</td><td>{v.clips}</td><td>{pct(v.wer)}</td><td>{pct(v.wer_raw)}</td>"
        f"<td>{pct(v.cer)}</td><td>{pct(v.cer_raw)}</td><td>{pct(v.sentence_language_accuracy)}</td></tr>"
        for lang, v in metrics.languages.items()
    )
    auroc = metrics.confidence.auroc_error
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font:15px system-ui,sans-serif;max-width:900px;margin:2rem auto}}td,th{{border:1px solid #ccc;padding:.2rem .6rem}}
table{{border-collapse:collapse}}img{{max-width:100%}}</style></head><body>
<h1>{escape(title)}</h1>
<p>model {escape(str(metrics.model_id))}, att_context {escape(str(metrics.att_context))},
manifest {escape(str(metrics.manifest))}; {metrics.clips_scored} clips scored, {metrics.clips_failed} failed.</p>
<table><tr><th>language</th><th>clips</th><th>WER</th><th>WER raw</th><th>CER</th><th>CER raw</th><th>sentence-language accuracy</th></tr>{body}</table>
<p>Confidence AUROC for "clip has an error": {"-" if auroc is None else f"{auroc:.3f}"}</p>
<img alt="WER per language" src="data:image/png;base64,{wer_png}">
<img alt="confidence histogram" src="data:image/png;base64,{hist_png}">
<img alt="reliability curve" src="data:image/png;base64,{rel_png}">
</body></html>"""


def pct(v: float | None) -> str:
    """A rate as a percentage with one decimal (``-`` when there is none)."""
    return "-" if v is None else f"{100 * v:.1f} %"


def read_labels(labels: str, options: storage.StorageOptions | None = None) -> list[PseudoLabel]:
    """Every pseudo-label of a job's output folder (local or ``s3://``)."""
    import pyarrow.dataset as pads

    fs, root = storage.pyarrow_filesystem(labels, options)
    return from_table(
        storage.pyarrow_call(labels, lambda: pads.dataset(root, filesystem=fs, format="parquet").to_table())
    )


def score_parts(
    labels: str, manifests: list[str], options: storage.StorageOptions | None = None
) -> dict[str, Evaluation]:
    """Manifest -> :func:`score` of its clips within the labels of an evaluation of their union
    (the labels are read once)."""
    rows = read_labels(labels, options)
    return {m: score(rows, read_references(m, options)) for m in manifests}


def run_evaluate(*, manifest: str, out: str, settings: JobSettings, quiet: bool = False) -> Evaluation:
    """Transcribe ``manifest`` with the batch job into ``OUT/labels`` (on the caller's Ray
    connection), score it, write ``metrics.json`` and ``report.html``."""
    from jobs.transcribe import TranscribeRequest, run_transcribe

    labels = f"{out.rstrip('/')}/labels"
    summary = run_transcribe(TranscribeRequest(input=manifest, out=labels, settings=settings, quiet=quiet))
    rows = read_labels(labels, settings.storage)
    metrics = replace(
        score(rows, read_references(manifest, settings.storage)),
        manifest=manifest,
        model_id=summary.model_ids[0] if summary.model_ids else None,
        att_context=list(rows[0].att_context) if rows and rows[0].att_context else None,
        labels=labels,
    )
    storage.write_bytes(
        f"{out.rstrip('/')}/metrics.json", json.dumps(metrics.to_dict(), indent=2).encode(), settings.storage
    )
    title = f"earmark evaluation: {Path(manifest).name}"
    storage.write_bytes(
        f"{out.rstrip('/')}/report.html", html_report(metrics, rows, title=title).encode(), settings.storage
    )
    return metrics

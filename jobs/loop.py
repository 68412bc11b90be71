"""``earmark demo loop``: the closed loop on a new accent, end to end, with before/after figures.

    earmark demo loop --out build/loop

1. **Data** (``demo.accent``): an accent pool (English read by espeak-ng voices the demo
   model never heard; ``--voice``, ``--variants`` and ``--speed`` choose others), a held-out part
   of the same accent, an original-language set (the four demo locales) and a replay set of the
   original kind.
2. **Transcribe** the accent pool with the batch job (pseudo-labels in Parquet).
3. **Route** into a SQLite review queue with a review budget of ``review_share`` of the clips.
4. **Review**, simulated: a scripted reviewer claims every routed task and submits the known
   reference. Only routed clips are reviewed; nothing else sees a reference.
5. **Export** NeMo manifests (corrections + trusted pseudo-labels; dev from reviewed clips).
6. **Fine-tune** the demo model on Ray Train with the exported train manifest, unchanged, plus
   the replay set (``--replay``), whose clips are anchored to the base model's outputs
   (``--anchor``); the dev manifests are the export's dev and the original set, so the gate sees
   every language, each manifest apart.
7. **Evaluate** parent and new model on the held-out accent clips and on the original set;
   **promote** through the registry's gate. ``loop-report.json`` and ``loop-report.html``
   (matplotlib) hold the figures.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asr.train_settings import TrainSettings
from demo import accent, speech
from jobs.cards import GateVerdict, Promotion
from jobs.evaluate import Evaluation, pct
from labeling.export import ExportSummary
from labeling.ingest import RouteReport
from records.manifest import manifest_base, read_manifest

if TYPE_CHECKING:
    from labeling.queue import ReviewQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    #: Accent clips transcribed and routed (a quarter of them reviewed).
    pool: int = 640
    heldout: int = 100
    #: Original-language clips (a quarter per locale). The "no language worse by 10 %" check
    #: needs about 3000 words a language: with 200 clips (1200 words, 55-90 errors) one model
    #: that was 13 % worse there was 1 % worse on 500 fresh clips.
    original: int = 2000
    replay: int = 1500
    #: The review budget: at most this share of the accent pool is reviewed.
    review_share: float = 0.25
    workers: int = 2
    #: The accent (see demo.accent): espeak-ng voice, words per minute, voice variants.
    voice: str = accent.ACCENT_VOICE
    speed: tuple[int, int] = accent.ACCENT_SPEED
    variants: tuple[str, ...] = accent.ACCENT_VARIANTS
    train: TrainSettings = field(
        # auto prompts for 90 % of the clips, as the demo model was trained (its forced prompts
        # write every tag in the forced locale, which code-switched replay clips would contradict);
        # the prediction network (the language model) stays frozen: an accent is acoustics; the
        # replay clips are anchored to the base's output distribution (without it the original
        # languages got up to 49 % worse; see TrainSettings.anchor_at). Weight 30 rather than 10:
        # measured when the loop's accent was British RP (now one --voice away), original en-US
        # 10-12 points less worse in two paired runs, for 4-5 points of accent gain.
        # The saved weights are 0.8 fine-tuned + 0.2 base (WiSE-FT): on the new voices, held-out
        # WER 15.4 % -> 17.7 % (of 33.5 %), original en-US and es-ES 4-7 % better than at 1.0.
        default_factory=lambda: TrainSettings(
            max_steps=150,
            lr=3e-4,
            steps_per_epoch=50,
            batch_duration=45.0,
            unified_auto_ratio=0.9,
            freeze="decoder",
            anchor=30.0,
            anchor_at="output",
            merge=0.8,
        )
    )
    #: Share of the accent corrections in the training samples (the rest: replay).
    accent_share: float = 0.4
    #: Routing: an accent clip is trusted only with utterance confidence >= this and every word >= 0.5.
    trust_confidence: float = 0.9


@dataclass(frozen=True, slots=True)
class AccentFigures:
    voice: str
    speed_wpm: list[int]
    variants: list[str]
    clips: int
    heldout_clips: int
    wer_before: float | None
    wer_after: float | None
    relative_reduction: float | None
    language_accuracy_before: float | None
    language_accuracy_after: float | None


@dataclass(frozen=True, slots=True)
class Change:
    before: float | None
    after: float | None
    relative_change: float | None


@dataclass(frozen=True, slots=True)
class ReviewFigures:
    reviewed: int
    share: float
    routing: RouteReport


@dataclass(frozen=True, slots=True)
class PseudoLabelQuality:
    """How wrong the trusted pseudo-labels that went into training were (the loop knows the truth)."""

    clips: int
    wer: float | None


@dataclass(frozen=True, slots=True)
class PromotionOutcome:
    record: Promotion | None
    #: Why the gate refused the model (None: promoted).
    refused: str | None


@dataclass(frozen=True, slots=True)
class ModelOutcome:
    version: str
    model_id: str
    train_s: float
    steps: int
    workers: int
    gate: GateVerdict
    promotion: PromotionOutcome


@dataclass(frozen=True, slots=True)
class LoopReport:
    """``loop-report.json``: the loop's figures before and after, and what it did on the way."""

    accent: AccentFigures
    #: Original-language WER (normalized) per language and ``all``.
    original: dict[str, Change]
    review: ReviewFigures
    export: ExportSummary
    pseudo_labels_in_train: PseudoLabelQuality
    model: ModelOutcome
    timings_s: dict[str, float]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_loop(out: Path, settings: LoopSettings | None = None, *, say: Callable[[str], None] = print) -> LoopReport:
    """The whole loop on the caller's Ray connection; writes ``loop-report.json`` and ``.html``."""
    from cluster.runtime import require_ray
    from jobs.finetune import FinetuneRequest, run_finetune
    from jobs.registry import Registry, RegistryError
    from labeling.export import ExportOptions, export_manifests
    from labeling.ingest import route_table
    from labeling.policy import Policy
    from labeling.queue import ReviewQueue

    require_ray()
    settings = settings or LoopSettings()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    # 1. data
    speech.check_voice(settings.voice, settings.variants)
    data = out / "data"
    sets = {  # name: (seed, clips, accent or original)
        "pool": (accent.ACCENT_SEED, settings.pool, True),
        "heldout": (accent.HELDOUT_SEED, settings.heldout, True),
        "original": (accent.ORIGINAL_SEED, settings.original, False),
        "replay": (accent.REPLAY_SEED, settings.replay, False),
    }
    manifests = {}
    for name, (seed, count, is_accent) in sets.items():
        folder, manifest = data / name, data / name / "manifest.jsonl"
        recipe: dict[str, Any] = {"seed": seed, "count": count}
        if is_accent:
            recipe |= {"voice": settings.voice, "speed": list(settings.speed), "variants": list(settings.variants)}
        made = folder / "recipe.json"
        # a rerun reuses a set only if it was made the same way (another --voice makes it again)
        if not manifest.exists() or not made.exists() or json.loads(made.read_text()) != recipe:
            shutil.rmtree(folder, ignore_errors=True)
            if is_accent:
                utts = accent.accent_utterances(
                    seed, count, voice=settings.voice, speed=settings.speed, variants=settings.variants
                )
            else:
                utts = accent.original_utterances(seed, count)
            accent.write_set(utts, folder)
            made.write_text(json.dumps(recipe))
        manifests[name] = manifest
    say(f"data: {settings.pool} accent clips to label, {settings.heldout} held out, {settings.original} original, "
        f"{settings.replay} replay (the accent: espeak-ng {settings.voice} voice, variants {','.join(settings.variants)}, "
        f"{settings.speed[0]}-{settings.speed[1]} words per minute)")  # fmt: skip
    lap("data_s")

    # 2. transcribe the accent pool
    labels = out / "labels"
    _transcribe(manifests["pool"], labels)
    lap("transcribe_s")

    # 3. route with a review budget
    queue = ReviewQueue.connect(f"sqlite:///{out / 'review.db'}")
    policy = Policy(
        confidence={"default": settings.trust_confidence}, word_confidence=0.5, max_fraction=settings.review_share
    )
    routed = route_table(queue, "accent", str(labels), policy)
    say(f"routed {routed.rows} clips: {routed.decisions}")

    # 4. the simulated review: routed clips only, the known reference as the correction
    refs = _references(manifests["pool"])
    sources = _sources(labels)
    reviewer = _reviewer(queue)
    while (task := queue.claim("accent", reviewer)) is not None:
        text, lang = refs[sources[task.clip_id]]
        queue.submit(task.id, reviewer, text=text, lang=lang)
    # every review of the project (a rerun of the loop finds the earlier ones done)
    reviewed = sum(v.get("done", 0) for v in queue.stats("accent")["tasks"].values())
    share = reviewed / settings.pool
    say(f"reviewed {reviewed} of {settings.pool} accent clips ({100 * share:.0f} %)")

    # 5. export
    export = export_manifests(queue, "accent", out / "export", ExportOptions(dev_fraction=0.2))
    pseudo_quality = _pseudo_label_wer(out / "export" / "train.jsonl", refs)
    lap("route_review_export_s")

    # 6. fine-tune (the export's train manifest unchanged, plus replay)
    registry = Registry(str(out / "registry"))
    card = run_finetune(
        FinetuneRequest(
            train=[str(out / "export" / "train.jsonl")],
            replay=[str(manifests["replay"])],
            dev=[str(out / "export" / "dev.jsonl"), str(manifests["original"])],
            registry=registry.uri,
            base="demo",
            name="accent",
            workers=settings.workers,
            settings=settings.train,
            mix=[settings.accent_share, 1 - settings.accent_share],
        )
    )
    lap("finetune_s")
    new_model = registry.path("accent", card.version, "model.nemo")

    # 7. evaluate both models on the held-out accent clips; the original set was one of the
    # gate's dev manifests, scored apart on the card
    heldout = {
        who: _evaluate(model, manifests["heldout"], out / "eval" / f"heldout-{who}").languages["all"]
        for who, model in (("parent", "demo"), ("new", new_model))
    }
    lap("evaluate_s")
    try:
        promotion = PromotionOutcome(record=registry.promote("accent", card.version), refused=None)
    except RegistryError as exc:
        promotion = PromotionOutcome(record=None, refused=str(exc))

    original_set = card.metrics.dev_sets[str(manifests["original"])]
    original = {
        lang: Change(
            before.wer,
            original_set.new[lang].wer if lang in original_set.new else None,
            _relative(before.wer, original_set.new[lang].wer if lang in original_set.new else None),
        )
        for lang, before in original_set.parent.items()
    }
    before, after = heldout["parent"], heldout["new"]
    reduction = _relative(before.wer, after.wer)
    report = LoopReport(
        accent=AccentFigures(
            voice=settings.voice,
            speed_wpm=list(settings.speed),
            variants=list(settings.variants),
            clips=settings.pool,
            heldout_clips=settings.heldout,
            wer_before=before.wer,
            wer_after=after.wer,
            relative_reduction=None if reduction is None else -reduction,
            language_accuracy_before=before.sentence_language_accuracy,
            language_accuracy_after=after.sentence_language_accuracy,
        ),
        original=original,
        review=ReviewFigures(reviewed=reviewed, share=share, routing=routed),
        export=export,
        pseudo_labels_in_train=pseudo_quality,
        model=ModelOutcome(
            version=card.version,
            model_id=card.model_id,
            train_s=card.training.train_s,
            steps=card.training.steps,
            workers=card.training.workers,
            gate=card.gate,
            promotion=promotion,
        ),
        timings_s=timings,
        settings=asdict(settings),
    )
    (out / "loop-report.json").write_text(json.dumps(report.to_dict(), indent=2))
    (out / "loop-report.html").write_text(html_report(report))
    return report


def _relative(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return (after - before) / before


def _transcribe(manifest: Path, labels: Path) -> None:
    from jobs.stages import JobSettings
    from jobs.transcribe import TranscribeRequest, run_transcribe

    settings = JobSettings(run_id="", model="demo")
    run_transcribe(TranscribeRequest(input=str(manifest), out=str(labels), settings=settings, quiet=True))


def _evaluate(model: str, manifest: Path, out: Path) -> Evaluation:
    from jobs.evaluate import run_evaluate
    from jobs.stages import JobSettings

    return run_evaluate(manifest=str(manifest), out=str(out), settings=JobSettings(run_id="", model=model), quiet=True)


def _references(manifest: Path) -> dict[str, tuple[str, str | None]]:
    """Absolute audio path -> (text, locale): the reference the simulated reviewer knows."""
    entries = read_manifest(manifest.read_bytes(), base=manifest_base(str(manifest)), name=str(manifest))
    return {e.audio_filepath: (accent.plain_text(e), e.locale) for e in entries}


def _sources(labels: Path) -> dict[str, str]:
    """clip id -> the absolute path of its audio."""
    from jobs.evaluate import read_labels

    return {label.clip_id: str(Path(label.source_uri).resolve()) for label in read_labels(str(labels))}


def _reviewer(queue: ReviewQueue) -> int:
    for reviewer in queue.reviewers():
        if reviewer.name == "simulated-reviewer":
            return reviewer.id
    reviewer, _ = queue.add_reviewer("simulated-reviewer")
    return reviewer.id


def _pseudo_label_wer(train_manifest: Path, refs: dict[str, tuple[str, str | None]]) -> PseudoLabelQuality:
    """How wrong the trusted pseudo-labels that went into training were (the loop knows the truth)."""
    from records.manifest import ORIGIN_PSEUDO
    from records.text import word_errors

    errors = words = clips = 0
    for entry in read_manifest(train_manifest.read_bytes(), name=str(train_manifest)):
        ref = refs.get(str(Path(entry.audio_filepath).resolve()))
        if entry.origin != ORIGIN_PSEUDO or ref is None:
            continue
        e, n = word_errors(ref[0], entry.text or "")
        errors, words, clips = errors + e, words + n, clips + 1
    return PseudoLabelQuality(clips=clips, wer=errors / words if words else None)


def accent_name(acc: AccentFigures) -> str:
    """espeak-ng voice+variants at MIN-MAX wpm, as in the report's ``accent``."""
    low, high = acc.speed_wpm
    return f"espeak-ng {acc.voice}+{','.join(acc.variants)}, {low}-{high} wpm"


def html_report(report: LoopReport) -> str:
    """Before/after bars (matplotlib, embedded PNG) and the figures as tables."""
    import matplotlib

    matplotlib.use("Agg")
    from html import escape

    import matplotlib.pyplot as plt

    acc, model = report.accent, report.model
    languages = {k: v for k, v in report.original.items() if k != "all"}
    labels = ["accent (held out)"] + [f"original {k}" for k in languages]
    before = [acc.wer_before or 0] + [v.before or 0 for v in languages.values()]
    after = [acc.wer_after or 0] + [v.after or 0 for v in languages.values()]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [100 * b for b in before], width=0.4, label="demo model (parent)", color="#8c8c8c")
    ax.bar([x + 0.2 for x in xs], [100 * a for a in after], width=0.4, label="fine-tuned", color="#4c72b0")
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_ylabel("WER (%)")
    ax.legend()
    ax.set_title("Before and after the loop")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode()

    rows = "".join(
        f"<tr><td>{escape(k)}</td><td>{pct(v.before)}</td><td>{pct(v.after)}</td><td>{pct(v.relative_change)}</td></tr>"
        for k, v in report.original.items()
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>earmark loop report</title>
<style>body{{font:15px system-ui,sans-serif;max-width:900px;margin:2rem auto}}td,th{{border:1px solid #ccc;padding:.2rem .6rem}}
table{{border-collapse:collapse}}img{{max-width:100%}}</style></head><body>
<h1>The loop on a new accent ({escape(accent_name(acc))})</h1>
<p>Held-out accent WER {pct(acc.wer_before)} &rarr; {pct(acc.wer_after)}
(relative reduction {pct(acc.relative_reduction)}); {report.review.reviewed} of {acc.clips} accent clips
reviewed ({pct(report.review.share)}). Model {escape(model.version)} trained {model.steps} steps in
{model.train_s:.0f} s on {model.workers} worker(s); gate {"passed" if model.gate.passed else "refused"}.</p>
<img alt="WER before and after" src="data:image/png;base64,{png}">
<h2>Original languages</h2>
<table><tr><th>language</th><th>before</th><th>after</th><th>relative change</th></tr>{rows}</table>
</body></html>"""

"""``earmark demo loop``: the closed loop on a new accent, end to end, with before/after figures.

    earmark demo loop --out build/loop

1. **Data** (``asr.demo.accent``): an accent pool (English read by espeak-ng voices the demo
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
from typing import Any

from asr.demo import accent, speech
from asr.training import TrainSettings

log = logging.getLogger(__name__)


@dataclass
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
    #: The accent (see asr.demo.accent): espeak-ng voice, words per minute, voice variants.
    voice: str = accent.ACCENT_VOICE
    speed: tuple[int, int] = accent.ACCENT_SPEED
    variants: tuple[str, ...] = accent.ACCENT_VARIANTS
    train: TrainSettings = field(
        # auto prompts for 90 % of the clips, as the demo model was trained (its forced prompts
        # write every tag in the forced locale, which code-switched replay clips would contradict);
        # the prediction network (the language model) stays frozen: an accent is acoustics; the
        # replay clips are anchored to the base's output distribution (without it the original
        # languages got up to 49 % worse; see TrainSettings.anchor_at). Weight 30 rather than 10:
        # with the British RP accent, original en-US 10-12 points less worse in two paired runs,
        # for 4-5 points of accent gain.
        # The saved weights are 0.8 fine-tuned + 0.2 base (WiSE-FT): on the new voices, held-out
        # WER 15.4 % -> 17.7 % (of 33.5 %), original en-US and es-ES 4-7 % better than at 1.0.
        default_factory=lambda: TrainSettings(
            max_steps=150,
            lr=3e-4,
            steps_per_epoch=50,
            batch_seconds=45.0,
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


def run_loop(out: Path, settings: LoopSettings | None = None, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    from cluster.runtime import connect
    from jobs.finetune import FinetuneRequest, run_finetune
    from jobs.registry import Registry, RegistryError
    from labeling.export import ExportOptions, export_manifests
    from labeling.ingest import route_table
    from labeling.policy import Policy
    from labeling.queue import ReviewQueue

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
    connect(None, quiet=True)
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
        ref = refs[sources[task.clip_id]]
        queue.submit(task.id, reviewer, text=ref["text_plain"], lang=ref["target_lang"])
    # every review of the project (a rerun of the loop finds the earlier ones done)
    reviewed = sum(v.get("done", 0) for v in queue.stats("accent")["tasks"].values())
    share = reviewed / settings.pool
    say(f"reviewed {reviewed} of {settings.pool} accent clips ({100 * share:.0f} %)")

    # 5. export
    export = export_manifests(queue, "accent", out / "export", ExportOptions(dev_fraction=0.2))
    pseudo_wer = _pseudo_label_wer(out / "export" / "train.jsonl", refs)
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
    new_model = registry.path("accent", card["version"], "model.nemo")

    # 7. evaluate both models on the held-out accent clips; the original set was one of the
    # gate's dev manifests, scored apart on the card
    evaluations = {}
    for who, model in (("parent", "demo"), ("new", new_model)):
        evaluations[("heldout", who)] = _evaluate(model, manifests["heldout"], out / "eval" / f"heldout-{who}")
        evaluations[("original", who)] = {"languages": card["metrics"]["dev_sets"][str(manifests["original"])][who]}
    lap("evaluate_s")
    try:
        promotion = registry.promote("accent", card["version"])
    except RegistryError as exc:
        promotion = {"refused": str(exc)}

    accent_before = evaluations[("heldout", "parent")]["languages"]["all"]["wer"]
    accent_after = evaluations[("heldout", "new")]["languages"]["all"]["wer"]
    original = {}
    for lang, before in evaluations[("original", "parent")]["languages"].items():
        after = evaluations[("original", "new")]["languages"].get(lang, {})
        original[lang] = {
            "before": before["wer"],
            "after": after.get("wer"),
            "relative_change": _relative(before["wer"], after.get("wer")),
        }
    report = {
        "accent": {
            "voice": settings.voice,
            "speed_wpm": list(settings.speed),
            "variants": list(settings.variants),
            "clips": settings.pool,
            "heldout_clips": settings.heldout,
            "wer_before": accent_before,
            "wer_after": accent_after,
            "relative_reduction": -_relative(accent_before, accent_after),
            "language_accuracy_before": evaluations[("heldout", "parent")]["languages"]["all"][
                "sentence_language_accuracy"
            ],
            "language_accuracy_after": evaluations[("heldout", "new")]["languages"]["all"][
                "sentence_language_accuracy"
            ],
        },
        "original": original,
        "review": {"reviewed": reviewed, "share": share, "routing": routed.to_dict()},
        "export": export,
        "pseudo_labels_in_train": pseudo_wer,
        "model": {
            "version": card["version"],
            "model_id": card["model_id"],
            "train_s": card["training"]["train_s"],
            "steps": card["training"]["steps"],
            "workers": card["training"]["workers"],
            "gate": card["gate"],
            "promotion": promotion,
        },
        "timings_s": timings,
        "settings": {**asdict(settings), "train": settings.train.to_dict()},
    }
    (out / "loop-report.json").write_text(json.dumps(report, indent=2))
    (out / "loop-report.html").write_text(html_report(report))
    return report


def _relative(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return (after - before) / before


def _transcribe(manifest: Path, labels: Path) -> dict[str, Any]:
    from jobs.stages import JobSettings
    from jobs.transcribe import TranscribeRequest, run_transcribe

    settings = JobSettings(run_id="", model="demo")
    return run_transcribe(TranscribeRequest(input=str(manifest), out=str(labels), settings=settings, quiet=True))


def _evaluate(model: str, manifest: Path, out: Path) -> dict[str, Any]:
    from jobs.evaluate import run_evaluate
    from jobs.stages import JobSettings

    return run_evaluate(manifest=str(manifest), out=str(out), settings=JobSettings(run_id="", model=model), quiet=True)


def _references(manifest: Path) -> dict[str, dict[str, Any]]:
    """Absolute audio path -> the manifest row (the reference the simulated reviewer knows)."""
    out = {}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[str((manifest.parent / row["audio_filepath"]).resolve())] = row
    return out


def _sources(labels: Path) -> dict[str, str]:
    import pyarrow.dataset as pads

    table = pads.dataset(str(labels), format="parquet").to_table(columns=["clip_id", "source_uri"])
    return {
        c: str(Path(s).resolve())
        for c, s in zip(table["clip_id"].to_pylist(), table["source_uri"].to_pylist(), strict=True)
    }


def _reviewer(queue: Any) -> int:
    for reviewer in queue.reviewers():
        if reviewer.name == "simulated-reviewer":
            return reviewer.id
    reviewer, _ = queue.add_reviewer("simulated-reviewer")
    return reviewer.id


def _pseudo_label_wer(train_manifest: Path, refs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How wrong the trusted pseudo-labels that went into training were (the loop knows the truth)."""
    import jiwer

    from asr.text import strip_tags
    from jobs.evaluate import normalize

    hyps, truths = [], []
    for line in train_manifest.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("origin") != "pseudo":
            continue
        ref = refs.get(str(Path(row["audio_filepath"]).resolve()))
        if ref is not None:
            hyps.append(normalize(strip_tags(row["text"])) or "-")
            truths.append(normalize(ref["text_plain"]))
    wer = jiwer.wer(truths, hyps) if truths else None
    return {"clips": len(truths), "wer": wer}


def accent_name(acc: dict[str, Any]) -> str:
    """espeak-ng voice+variants at MIN-MAX wpm, as in the report's ``accent``."""
    low, high = acc["speed_wpm"]
    return f"espeak-ng {acc['voice']}+{','.join(acc['variants'])}, {low}-{high} wpm"


def html_report(report: dict[str, Any]) -> str:
    """Before/after bars (matplotlib, embedded PNG) and the figures as tables."""
    import matplotlib

    matplotlib.use("Agg")
    from html import escape

    import matplotlib.pyplot as plt

    labels = ["accent (held out)"] + [f"original {k}" for k in report["original"] if k != "all"]
    before = [report["accent"]["wer_before"]] + [v["before"] for k, v in report["original"].items() if k != "all"]
    after = [report["accent"]["wer_after"]] + [v["after"] or 0 for k, v in report["original"].items() if k != "all"]
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

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    acc = report["accent"]
    rows = "".join(
        f"<tr><td>{escape(k)}</td><td>{pct(v['before'])}</td><td>{pct(v['after'])}</td>"
        f"<td>{pct(v['relative_change'])}</td></tr>"
        for k, v in report["original"].items()
    )
    model = report["model"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>earmark loop report</title>
<style>body{{font:15px system-ui,sans-serif;max-width:900px;margin:2rem auto}}td,th{{border:1px solid #ccc;padding:.2rem .6rem}}
table{{border-collapse:collapse}}img{{max-width:100%}}</style></head><body>
<h1>The loop on a new accent ({escape(accent_name(acc))})</h1>
<p>Held-out accent WER {pct(acc["wer_before"])} &rarr; {pct(acc["wer_after"])}
(relative reduction {pct(acc["relative_reduction"])}); {report["review"]["reviewed"]} of {acc["clips"]} accent clips
reviewed ({pct(report["review"]["share"])}). Model {escape(model["version"])} trained {model["steps"]} steps in
{model["train_s"]:.0f} s on {model["workers"]} worker(s); gate {"passed" if model["gate"]["passed"] else "refused"}.</p>
<img alt="WER before and after" src="data:image/png;base64,{png}">
<h2>Original languages</h2>
<table><tr><th>language</th><th>before</th><th>after</th><th>relative change</th></tr>{rows}</table>
</body></html>"""

"""The closed loop on a new accent, end to end on CPU (``earmark demo loop``): transcribe ->
route -> simulated review of the routed clips only -> export -> fine-tune on Ray Train (two
workers) -> evaluate -> gate. The figures are written to the run's report and checked here.

The issue's line, asserted as it stands: held-out accent WER at least 30 % lower with at most 25 %
of the accent clips reviewed, and no original language worse by more than 10 % relative (on 500
original clips a language, about 3000 words: 200 clips were too few to tell 10 % from noise).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from jobs.cards import ModelCard
from jobs.registry import gate_card

pytestmark = pytest.mark.slow


@pytest.fixture()
def ray_local():
    from cluster.runtime import ray_session

    with ray_session():
        yield


def test_the_loop_improves_the_new_accent_keeps_the_original_languages_and_promotes(ray_local, tmp_path: Path) -> None:
    from jobs.loop import LoopSettings, run_loop

    out = tmp_path / "loop"
    report = run_loop(out, LoopSettings(workers=2), say=lambda m: None)

    accent = report.accent
    assert accent.wer_before > 0.25, "the accent must be new to the demo model"
    assert accent.relative_reduction >= 0.30, accent
    assert 0 < report.review.reviewed and report.review.share <= 0.25
    original = report.original
    assert set(original) >= {"de-DE", "en-US", "es-ES", "fr-FR", "all"}
    assert all(v.before is not None and v.after is not None for v in original.values())
    worse = {lang: v.relative_change for lang, v in original.items() if v.relative_change > 0.10}
    assert not worse, f"original languages more than 10 % worse: {worse}; the report: {original}"

    model = report.model
    assert model.workers == 2 and model.steps == 150
    card = ModelCard.from_dict(json.loads((out / "registry" / "accent" / model.version / "card.json").read_text()))
    # the gate decides from the card's own dev figures (the export's dev and the original set
    # each apart too: their en-US must not pool), and this model passes it and is promoted
    assert len(card.metrics.dev_sets) == 2
    assert gate_card(card.metrics) == [] and card.gate.passed and card.gate.reasons == [], card.gate
    assert model.promotion.refused is None and model.promotion.record.forced is False
    assert json.loads((out / "registry" / "accent" / "promoted.json").read_text())["version"] == model.version

    # the figures are in the run's report
    saved = json.loads((out / "loop-report.json").read_text())
    assert saved["accent"]["wer_after"] == accent.wer_after
    assert "data:image/png;base64," in (out / "loop-report.html").read_text()
    # the export's train manifest went into fine-tuning unchanged (its hash is on the card)
    digest = hashlib.sha256((out / "export" / "train.jsonl").read_bytes()).hexdigest()
    assert card.data["train"][0].sha256 == digest
    exported = sum(n for by_lang in report.export.train.values() for n in by_lang.values())
    assert card.data["train"][0].lines == exported

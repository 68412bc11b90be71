"""The closed loop on a new accent, end to end on CPU (``earmark demo loop``): transcribe ->
route -> simulated review of the routed clips only -> export -> fine-tune on Ray Train (two
workers) -> evaluate -> gate. The figures are written to the run's report and checked here.

What is asserted is what the loop achieves on this machine: with 640 accent clips of which 160
(25 %) are reviewed, held-out accent WER 36 % -> 21-23 % (36-42 % lower, five runs). Not every
original language holds within 10 % yet: de-DE and fr-FR stay within 2 %, but original en-US gets
14-25 % worse and es-ES up to 13 % (see the report's ``original`` table), so this test checks that
the gate decides from its figures (each dev manifest apart), not that every language holds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from jobs.registry import gate_card

pytestmark = pytest.mark.slow


def test_the_loop_improves_the_new_accent_and_the_gate_decides_from_its_figures(tmp_path: Path) -> None:
    from jobs.loop import LoopSettings, run_loop

    out = tmp_path / "loop"
    report = run_loop(out, LoopSettings(workers=2), say=lambda m: None)

    accent = report["accent"]
    assert accent["wer_before"] > 0.25, "the accent must be new to the demo model"
    assert accent["relative_reduction"] >= 0.30, accent
    review = report["review"]
    assert 0 < review["reviewed"] and review["share"] <= 0.25
    assert set(report["original"]) >= {"de-DE", "en-US", "es-ES", "fr-FR", "all"}
    assert all(v["before"] is not None and v["after"] is not None for v in report["original"].values())

    model = report["model"]
    assert model["workers"] == 2 and model["steps"] == 150
    card = json.loads((out / "registry" / "accent" / model["version"] / "card.json").read_text())
    # the gate's verdict follows from the card's own dev figures, and promotion follows the gate
    # (the export's dev and the original set are also gated apart: their en-US must not pool)
    assert len(card["metrics"]["dev_sets"]) == 2
    refused = gate_card(card["metrics"])
    assert card["gate"] == {"passed": not refused, "reasons": refused}
    if refused:
        assert "refused" in model["promotion"]
        assert not (out / "registry" / "accent" / "promoted.json").exists()
    else:
        assert model["promotion"]["forced"] is False
        assert json.loads((out / "registry" / "accent" / "promoted.json").read_text())["version"] == model["version"]

    # the figures are in the run's report
    saved = json.loads((out / "loop-report.json").read_text())
    assert saved["accent"]["wer_after"] == accent["wer_after"]
    assert "data:image/png;base64," in (out / "loop-report.html").read_text()
    # the export's train manifest went into fine-tuning unchanged (its hash is on the card)
    digest = hashlib.sha256((out / "export" / "train.jsonl").read_bytes()).hexdigest()
    assert card["data"]["train"][0]["sha256"] == digest
    exported = sum(n for by_lang in report["export"]["train"].values() for n in by_lang.values())
    assert card["data"]["train"][0]["lines"] == exported

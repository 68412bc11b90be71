"""The closed loop on a new accent, end to end on CPU (``earmark demo loop``): transcribe ->
route -> simulated review of the routed clips only -> export -> fine-tune on Ray Train (two
workers) -> evaluate -> promote. The figures the issue asks for are asserted and written to the
run's report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_loop_makes_a_better_model_for_the_new_accent(tmp_path: Path) -> None:
    from jobs.loop import LoopSettings, run_loop

    out = tmp_path / "loop"
    report = run_loop(out, LoopSettings(workers=2), say=lambda m: None)

    accent = report["accent"]
    assert accent["wer_before"] > 0.3, "the accent must be new to the demo model"
    assert accent["relative_reduction"] >= 0.30, accent
    assert report["review"]["share"] <= 0.25 and report["review"]["reviewed"] > 0
    for lang, v in report["original"].items():
        assert v["after"] is not None and v["after"] <= v["before"] * 1.10 + 1e-9, (lang, v)
    model = report["model"]
    assert model["workers"] == 2 and model["gate"]["passed"], model["gate"]
    assert "refused" not in model["promotion"] and model["promotion"]["forced"] is False

    # the figures are in the run's report, and the registry serves the new version
    saved = json.loads((out / "loop-report.json").read_text())
    assert saved["accent"]["wer_after"] == accent["wer_after"]
    assert "data:image/png;base64," in (out / "loop-report.html").read_text()
    assert json.loads((out / "registry" / "accent" / "promoted.json").read_text())["version"] == model["version"]
    # the export's train manifest went into fine-tuning unchanged (its hash is on the card)
    card = json.loads((out / "registry" / "accent" / model["version"] / "card.json").read_text())
    import hashlib

    digest = hashlib.sha256((out / "export" / "train.jsonl").read_bytes()).hexdigest()
    assert card["data"]["train"][0]["sha256"] == digest

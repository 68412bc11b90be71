"""The model registry and the promotion gate (no model work: cards are written by hand here)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from asr.train_settings import TrainSettings
from jobs.cards import CardMetrics, DevSet, GateVerdict, ModelCard, ParentRef, TrainingRecord
from jobs.cli import app
from jobs.evaluate import ConfidenceQuality, Evaluation, LanguageScores
from jobs.registry import Registry, RegistryError, gate, gate_card


def langs(all_wer: float, **per: float) -> dict[str, LanguageScores]:
    def scores(wer: float) -> LanguageScores:
        return LanguageScores(clips=10, wer=wer, wer_raw=None, cer=None, cer_raw=None, sentence_language_accuracy=None)

    return {"all": scores(all_wer), **{k.replace("_", "-"): scores(v) for k, v in per.items()}}


def evaluation(languages: dict[str, LanguageScores]) -> Evaluation:
    return Evaluation(10, 0, languages, ConfidenceQuality(None, [], 0))


def card(name: str, version: str, new: dict[str, LanguageScores], old: dict[str, LanguageScores]) -> ModelCard:
    """A card as `earmark finetune` writes it, with made-up figures."""
    refused = gate(new, old)
    return ModelCard(
        name=name,
        version=version,
        model_id=f"{name}-{version}@0",
        created_at="2026-12-03T10:00:00+00:00",
        base="earmark-demo@x",
        parent=ParentRef(model_id="earmark-demo@x", ref="demo"),
        data={"train": [], "replay": [], "dev": []},
        training=TrainingRecord(TrainSettings(), 1, 0.0, None, 1.0, 2.0, 300, 1, [], [], None, f"{name}-{version}"),
        metrics=CardMetrics(dev=evaluation(new), parent_dev=evaluation(old)),
        gate=GateVerdict(passed=not refused, reasons=refused),
    )


def test_gate_passes_a_better_model():
    assert gate(langs(0.10, de_DE=0.05, en_US=0.15), langs(0.12, de_DE=0.05, en_US=0.19)) == []


def test_gate_refuses_no_improvement():
    (reason,) = gate(langs(0.12, de_DE=0.05), langs(0.12, de_DE=0.05))
    assert "not better" in reason


def test_gate_refuses_a_language_regression_beyond_the_tolerance():
    reasons = gate(langs(0.10, de_DE=0.20, en_US=0.05), langs(0.15, de_DE=0.10, en_US=0.20))
    assert len(reasons) == 1 and reasons[0].startswith("de-DE:")
    # within tolerance (10 % relative + half a point absolute): fine
    assert gate(langs(0.10, de_DE=0.114), langs(0.15, de_DE=0.10), tolerance=0.10) == []
    assert gate(langs(0.10, de_DE=0.114), langs(0.15, de_DE=0.10), tolerance=0.05) != []


def test_gate_refuses_a_language_the_candidate_was_not_measured_on():
    reasons = gate(langs(0.10), langs(0.15, fr_FR=0.1))
    assert reasons == ["fr-FR: the parent was measured on it, the candidate was not"]


def test_gate_needs_metrics():
    assert gate({}, langs(0.1)) != []


def test_each_dev_manifest_is_gated_apart_so_a_pooled_gain_cannot_hide_a_loss():
    # en-US pooled from an accent set (30 % -> 20 %) and the original set (5 % -> 7 %) improves,
    # yet the original en-US clips got 40 % worse: refused, naming the manifest
    metrics = CardMetrics(
        dev=evaluation(langs(0.15, en_US=0.15)),
        parent_dev=evaluation(langs(0.20, en_US=0.20)),
        dev_sets={
            "accent-dev.jsonl": DevSet(new=langs(0.20, en_US=0.20), parent=langs(0.30, en_US=0.30)),
            "original.jsonl": DevSet(new=langs(0.07, en_US=0.07), parent=langs(0.05, en_US=0.05)),
        },
    )
    assert gate(metrics.dev.languages, metrics.parent_dev.languages) == []
    (reason,) = gate_card(metrics)
    assert reason.startswith("original.jsonl: en-US: WER 7.0 %")
    metrics.dev_sets["original.jsonl"] = DevSet(new=langs(0.052, en_US=0.052), parent=langs(0.05, en_US=0.05))
    assert gate_card(metrics) == []


def _publish(reg: Registry, tmp_path, name: str, new: float, old: float) -> str:
    version = reg.next_version(name)
    model = tmp_path / f"{name}-{version}.nemo"
    model.write_bytes(b"not really a model")
    reg.publish(name, version, str(model), card(name, version, langs(new, de_DE=new), langs(old, de_DE=old)))
    return version


def test_versions_cards_and_promotion(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    assert reg.names() == [] and reg.versions("accent") == []
    v1 = _publish(reg, tmp_path, "accent", new=0.10, old=0.20)
    v2 = _publish(reg, tmp_path, "accent", new=0.30, old=0.20)
    assert (v1, v2) == ("v0001", "v0002")
    assert reg.versions("accent") == ["v0001", "v0002"] and reg.names() == ["accent"]
    assert reg.card("accent").version == "v0002"  # nothing promoted: the latest
    with pytest.raises(RegistryError, match="never overwritten"):
        reg.publish("accent", "v0001", str(tmp_path / "accent-v0001.nemo"), reg.card("accent", "v0001"))

    record = reg.promote("accent", "v0001")
    assert record.forced is False and reg.promoted("accent") == "v0001"
    assert reg.card("accent").version == "v0001"
    assert reg.model_uri("accent").endswith("accent/v0001/model.nemo")

    with pytest.raises(RegistryError, match="not better"):
        reg.promote("accent", "v0002")
    assert reg.promoted("accent") == "v0001"
    with pytest.raises(RegistryError, match="--reason"):
        reg.promote("accent", "v0002", force=True)
    record = reg.promote("accent", "v0002", force=True, reason="the dev set is stale")
    assert record.forced is True and record.reason == "the dev set is stale" and record.gate
    history = json.loads((tmp_path / "reg" / "accent" / "promoted.json").read_text())["history"]
    assert [h["version"] for h in history] == ["v0001", "v0002"]
    promoted = reg.card("accent", "v0002")
    assert promoted.promotion is not None and promoted.promotion.reason == "the dev set is stale"
    # a card reads back as it was written, nested records included
    assert ModelCard.from_dict(promoted.to_dict()) == promoted


def test_unknown_names_and_versions_say_what_exists(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    _publish(reg, tmp_path, "accent", new=0.1, old=0.2)
    with pytest.raises(RegistryError, match=r"v0009 is not in the registry .* \(versions of accent: v0001\)"):
        reg.card("accent", "v0009")
    with pytest.raises(RegistryError, match=r"no model named .other. .* \(names: accent\)"):
        reg.card("other")
    with pytest.raises(RegistryError, match="model name"):
        reg.next_version("../etc")


def test_models_cli(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    _publish(reg, tmp_path, "accent", new=0.10, old=0.20)
    _publish(reg, tmp_path, "accent", new=0.30, old=0.20)
    runner = CliRunner()
    out = runner.invoke(app, ["models", "list", "--registry", reg.uri, "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [(r["version"], r["gate"], r["promoted"]) for r in rows] == [
        ("v0001", "pass", False),
        ("v0002", "refused", False),
    ]
    out = runner.invoke(app, ["models", "promote", "accent/v0002", "--registry", reg.uri])
    assert out.exit_code == 3 and "not promoted" in out.output and "--force" in out.output
    out = runner.invoke(app, ["models", "promote", "accent/v0001", "--registry", reg.uri])
    assert out.exit_code == 0 and "promoted accent/v0001" in out.output
    out = runner.invoke(app, ["models", "show", "accent", "--registry", reg.uri])
    assert json.loads(out.stdout)["version"] == "v0001"
    out = runner.invoke(app, ["models", "list", "--registry", reg.uri])
    assert out.exit_code == 0 and "v0002" in out.output
    out = runner.invoke(app, ["models", "show", "nope", "--registry", reg.uri])
    assert out.exit_code == 3 and "no model named 'nope'" in out.output

"""Model cards: what a registered model is, what it was trained and gated on, and how it did.

A card is ``<registry>/<name>/<version>/card.json``, written by ``earmark finetune`` once the
model and both evaluations are in place, and read by ``earmark models`` and the promotion gate.
:class:`ModelCard` is its one form: :meth:`ModelCard.to_dict` writes it and
:meth:`ModelCard.from_dict` reads it back (validated, nested records included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from asr.train_settings import TrainSettings
from jobs.evaluate import Evaluation, LanguageScores


@dataclass(frozen=True, slots=True)
class DataRecord:
    """A manifest a model was trained or gated on, as it was then."""

    uri: str
    sha256: str
    lines: int
    hours: float
    languages: dict[str, int]


@dataclass(frozen=True, slots=True)
class ParentRef:
    """The model a version was fine-tuned from."""

    model_id: str
    #: ``demo``, a .nemo path or URI, or ``NAME/VERSION`` of the registry.
    ref: str
    #: The parent's own base (for a registry parent).
    base: str | None = None


@dataclass(frozen=True, slots=True)
class DevSet:
    """One dev manifest's WER per language, for the new model and its parent (gated apart)."""

    new: dict[str, LanguageScores]
    parent: dict[str, LanguageScores]


@dataclass(frozen=True, slots=True)
class CardMetrics:
    #: The new model on the (combined) dev manifests, and its parent on the same clips.
    dev: Evaluation
    parent_dev: Evaluation
    #: With several dev manifests: each one apart, by URI.
    dev_sets: dict[str, DevSet] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GateVerdict:
    passed: bool
    #: Why the gate refuses the model (empty when it passes).
    reasons: list[str]


@dataclass(frozen=True, slots=True)
class Promotion:
    version: str
    at: str
    #: Promoted although the gate refused it (``--force``; ``reason`` says why).
    forced: bool
    reason: str | None
    #: The gate's reasons at the time (empty when it passed).
    gate: list[str]


@dataclass(frozen=True, slots=True)
class TrainingRecord:
    settings: TrainSettings
    workers: int
    gpus_per_worker: float
    #: Each --train then --replay manifest's share of the samples (None: by their sizes).
    mix: list[float] | None
    train_s: float
    wall_s: float
    steps: int
    #: Worker-group starts (1 + restarts after failures), with what each resumed from.
    attempts: int
    resumed_from_steps: list[int]
    attempt_log: list[dict[str, Any]]
    #: The anchor's mean distance over the last epoch (None without ``--anchor``).
    anchor_distance_last_epoch: float | None
    #: Ray Train's run name (its checkpoints are in ``<registry>/_train/<ray_run>``).
    ray_run: str
    #: True when this command resumed a run whose driver had died (the same command run again).
    resumed_run: bool = False


@dataclass(frozen=True, slots=True)
class ModelCard:
    name: str
    version: str
    model_id: str
    created_at: str
    #: The original checkpoint at the root of the model's lineage.
    base: str
    parent: ParentRef
    #: ``train``, ``replay`` and ``dev`` manifests.
    data: dict[str, list[DataRecord]]
    training: TrainingRecord
    metrics: CardMetrics
    gate: GateVerdict
    promotion: Promotion | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def with_promotion(self, promotion: Promotion) -> ModelCard:
        return replace(self, promotion=promotion)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        from pydantic import TypeAdapter

        return TypeAdapter(cls).validate_python(data)

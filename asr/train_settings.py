"""Fine-tuning settings and the NeMo data and optimiser configs they make (no torch, no Ray).

The job (``jobs/finetune.py``) and the demo loop read these in the driver, which never loads
torch; the workers pass them to :mod:`asr.training`.

* **Data**: NeMo's Lhotse prompt dataset (``LhotseSpeechToTextBpeDatasetWithPromptIndex``) over
  NeMo manifests. The locale comes from each line's ``target_lang``; training draws the prompt
  per clip in ``unified`` mode (``auto`` or the clip's locale), so the model keeps both detecting
  and obeying languages; validation uses ``langID`` (deterministic). Transcripts keep the
  language tags as the model writes them, so fine-tuning does not unlearn detection.
* **Steps**: Lhotse loaders have no length; an "epoch" is ``steps_per_epoch`` steps, and each
  epoch end is a checkpoint (``RayTrainReportCallback`` reports one per epoch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from records.manifest import LANG_FIELD, REQUIRED_FOR_TRAINING, ManifestError, count_entries, iter_manifest

__all__ = ["ManifestError", "ManifestStats", "TrainSettings", "check_manifest", "data_config", "optim_config"]

FREEZE_CHOICES = ("none", "encoder", "decoder", "head")
#: The manifests' tag that marks replay clips (what the model already knows) in the Lhotse mix.
ANCHOR_TAG = "anchor"
ANCHOR_POINTS = ("output", "encoder")


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int = 300
    lr: float = 5e-4
    #: ``decoder``: keep the prediction network (the model's language model) as it is and adapt the
    #: acoustics; a new accent then moves the other languages much less (measured on the demo
    #: model: +12 % instead of +22 % WER on the original languages, for a larger accent gain).
    #: ``encoder``: train only the prediction network, joint and prompt projection.
    #: ``head``: keep the prediction network, joint and prompt projection; train the encoder only
    #: (with ``anchor``, holding the encoder's output on replay clips holds the whole model's).
    freeze: str = "none"
    #: Audio seconds per training batch (Lhotse's dynamic batches; the engine's ``batch_seconds``
    #: is another thing: padded audio per forward pass).
    batch_duration: float = 45.0
    warmup_steps: int = 10
    #: Share of training clips prompted with ``auto`` (the rest with their own locale).
    unified_auto_ratio: float = 0.5
    steps_per_epoch: int = 25
    #: Dev batches validated at each checkpoint (a quick check; the full dev set is scored after training).
    val_batches: int = 8
    weight_decay: float = 1e-3
    seed: int = 0
    #: Clips longer than this are left out of training (seconds).
    max_duration: float = 30.0
    #: Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): the saved model is
    #: ``(1 - merge) * base + merge * fine-tuned``. Below 1 it keeps more of what the base knew
    #: (other languages and accents) for a little of the new gain; 1.0 keeps the fine-tuned weights.
    merge: float = 1.0
    #: Function-space anchor (distillation from the base, as in learning without forgetting): on
    #: replay clips the loss adds ``anchor`` x the distance (see ``anchor_at``) between the trained
    #: model and the base model on the same clip. Replay clips then keep the base model's
    #: behaviour rather than only its labels, and the new data moves what replay does not pin. 0: off.
    anchor: float = 0.0
    #: Where the anchor holds the replay clips: ``output`` (the KL divergence of the trained
    #: model's output distribution from the base's over the RNN-T lattice, as in learning without
    #: forgetting) or ``encoder`` (the squared distance of the encoder's output). Measured on the
    #: demo model (weight 10, prediction network frozen): ``output`` kept the original languages
    #: within +2 % for a 30 % accent gain, ``encoder`` within -6 % for 26 %.
    anchor_at: str = "output"

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE_CHOICES:
            raise ValueError(f"--freeze {self.freeze!r}: use one of {', '.join(FREEZE_CHOICES)}")
        if self.max_steps < 1 or self.steps_per_epoch < 1:
            raise ValueError("--max-steps and the steps per checkpoint must be at least 1")
        if not 0 < self.merge <= 1:
            raise ValueError(f"--merge {self.merge}: expected a weight in (0, 1] (1 = the fine-tuned weights)")
        if self.anchor_at not in ANCHOR_POINTS:
            raise ValueError(f"--anchor-at {self.anchor_at!r}: use one of {', '.join(ANCHOR_POINTS)}")
        if self.anchor < 0:
            raise ValueError(f"--anchor {self.anchor}: expected a weight >= 0 (0 = off)")
        if not 0 < self.lr < 1:
            raise ValueError(f"--lr {self.lr}: expected a learning rate such as 1e-4")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ManifestStats:
    """What a training or dev manifest holds: its lines, hours of audio and lines per locale."""

    lines: int
    hours: float
    languages: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_manifest(name: str, data: bytes | str, prompt_dictionary: dict[str, int]) -> ManifestStats:
    """Check the NeMo manifest ``data`` (named ``name`` in messages) before any worker starts:
    every line must have audio, a duration, text and a locale the model knows."""
    lines, seconds = 0, 0.0
    langs: dict[str, int] = {}
    for number, entry in iter_manifest(data, name=name):
        where = f"{name}:{number}"
        missing = entry.missing(*REQUIRED_FOR_TRAINING)
        if missing:
            raise ManifestError(f"{where}: missing {', '.join(missing)} (NeMo manifests need all three)")
        lang = entry.target_lang
        if not lang:
            raise ManifestError(f"{where}: no {LANG_FIELD}; `earmark export` writes it, add it to hand-made lines")
        if lang not in prompt_dictionary:
            known = ", ".join(sorted(k for k in prompt_dictionary if "-" in k))
            raise ManifestError(f"{where}: the model has no locale {lang!r} (it knows {known})")
        lines += 1
        seconds += entry.duration or 0.0
        langs[lang] = langs.get(lang, 0) + 1
    if not lines:
        raise ManifestError(f"{name}: no lines; export some reviewed clips first (earmark export)")
    return ManifestStats(lines, seconds / 3600, dict(sorted(langs.items())))


def data_config(
    manifests: Sequence[str],
    model: Any,
    settings: TrainSettings,
    *,
    train: bool,
    mix: Sequence[float] | None = None,
    replay: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``train_ds`` / ``validation_ds`` config of the Lhotse prompt dataset. ``mix`` gives
    each manifest's share of the samples (Lhotse's default is proportional to their sizes,
    which drowns a small set of corrections in a large replay set). Clips of the ``replay``
    manifests (some of ``manifests``) carry :data:`ANCHOR_TAG` for :func:`attach_anchor`."""
    defaults = model.cfg.model_defaults
    if (mix is not None or replay) and len(manifests) > 1:
        # NeMo 3.0 reads [[path, weight], ...] for tarred data only; input_cfg weights any source
        # and tags its clips. Without a mix, the weights are the sizes (Lhotse's default).
        weights = list(mix) if mix is not None else [_count_lines(m) for m in manifests]
        sources: dict[str, Any] = {
            "input_cfg": [
                {"type": "nemo", "manifest_filepath": m, "weight": float(w)}
                | ({"tags": {ANCHOR_TAG: True}} if m in replay else {})
                for m, w in zip(manifests, weights, strict=True)
            ]
        }
    else:
        sources = {"manifest_filepath": list(manifests) if len(manifests) > 1 else manifests[0]}
    return {
        "use_lhotse": True,
        **sources,
        "sample_rate": int(model.cfg.sample_rate),
        "lang_field": LANG_FIELD,
        "prompt_dictionary": dict(defaults.prompt_dictionary),
        "num_prompts": int(defaults.get("num_prompts", 128)),
        "default_prompt_mode": "unified" if train else "langID",
        "unified_auto_ratio": settings.unified_auto_ratio,
        "batch_duration": settings.batch_duration,
        "max_duration": settings.max_duration,
        "shuffle": train,
        "shuffle_buffer_size": 10_000,
        "seed": settings.seed,
        "shard_seed": "randomized" if train else settings.seed,
        "force_finite": not train,
        "num_workers": 0,
        "pin_memory": False,
    }


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return count_entries(f)[0]


def optim_config(settings: TrainSettings) -> dict[str, Any]:
    """AdamW with linear warm-up and cosine decay to 5 % over ``max_steps``."""
    return {
        "name": "adamw",
        "lr": settings.lr,
        "weight_decay": settings.weight_decay,
        "sched": {
            "name": "CosineAnnealing",
            "warmup_steps": min(settings.warmup_steps, max(0, settings.max_steps - 1)),
            "min_lr": settings.lr * 0.05,
            "max_steps": settings.max_steps,
        },
    }


def epochs_for(settings: TrainSettings) -> int:
    return math.ceil(settings.max_steps / settings.steps_per_epoch)

"""Fine-tuning the prompt model with NeMo and Lightning: data, optimiser, loss (no Ray here).

``jobs/finetune.py`` runs this on Ray Train workers; everything here also runs in one plain
process, which is how it is tested without a cluster.

* **Data**: NeMo's Lhotse prompt dataset (``LhotseSpeechToTextBpeDatasetWithPromptIndex``) over
  NeMo manifests. The locale comes from each line's ``target_lang``; training draws the prompt
  per clip in ``unified`` mode (``auto`` or the clip's locale, half and half), so the model keeps
  both detecting and obeying languages; validation uses ``langID`` (deterministic). Transcripts
  keep the language tags as the model writes them, so fine-tuning does not unlearn detection.
* **Steps**: Lhotse loaders have no length; an "epoch" is ``steps_per_epoch`` steps, and each
  epoch end is a checkpoint (``RayTrainReportCallback`` reports one per epoch).
* **Loss**: on CPU NeMo's numba RNN-T loss costs ~5 s a batch; :class:`VectorisedRNNTLoss`
  (``asr.losses``, the same value to float precision) replaces it there. GPUs keep NeMo's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

FREEZE_CHOICES = ("none", "encoder", "decoder")


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int = 300
    lr: float = 5e-4
    #: ``decoder``: keep the prediction network (the model's language model) as it is and adapt the
    #: acoustics; a new accent then moves the other languages much less (measured on the demo
    #: model: +12 % instead of +22 % WER on the original languages, for a larger accent gain).
    #: ``encoder``: train only the prediction network, joint and prompt projection.
    freeze: str = "none"
    #: Audio seconds per batch (Lhotse's dynamic batches).
    batch_seconds: float = 45.0
    warmup_steps: int = 10
    #: Share of training clips prompted with ``auto`` (the rest with their own locale).
    unified_auto_ratio: float = 0.5
    steps_per_epoch: int = 25
    weight_decay: float = 1e-3
    seed: int = 0
    #: Clips longer than this are left out of training (seconds).
    max_duration: float = 30.0
    #: Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): the saved model is
    #: ``(1 - merge) * base + merge * fine-tuned``. Below 1 it keeps more of what the base knew
    #: (other languages and accents) for a little of the new gain; 1.0 keeps the fine-tuned weights.
    merge: float = 1.0

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE_CHOICES:
            raise ValueError(f"--freeze {self.freeze!r}: use one of {', '.join(FREEZE_CHOICES)}")
        if self.max_steps < 1 or self.steps_per_epoch < 1:
            raise ValueError("--max-steps and the steps per checkpoint must be at least 1")
        if not 0 < self.merge <= 1:
            raise ValueError(f"--merge {self.merge}: expected a weight in (0, 1] (1 = the fine-tuned weights)")
        if not 0 < self.lr < 1:
            raise ValueError(f"--lr {self.lr}: expected a learning rate such as 1e-4")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ManifestError(ValueError):
    """A training or dev manifest that cannot be used; the message names the file and line."""


def check_manifest(name: str, text: str, prompt_dictionary: dict[str, int]) -> dict[str, Any]:
    """Check the NeMo manifest ``text`` (named ``name`` in messages) before any worker starts:
    every line must have audio, a duration, text and a locale the model knows. Returns
    ``{"lines", "hours", "languages": {locale: lines}}``."""
    lines, seconds, langs = 0, 0.0, {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where}: not JSON ({exc.msg}); each line must be one JSON object") from exc
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: expected a JSON object per line")
        missing = [k for k in ("audio_filepath", "duration", "text") if row.get(k) in (None, "")]
        if missing:
            raise ManifestError(f"{where}: missing {', '.join(missing)} (NeMo manifests need all three)")
        lang = row.get("target_lang")
        if not lang:
            raise ManifestError(f"{where}: no target_lang; `earmark export` writes it, add it to hand-made lines")
        if lang not in prompt_dictionary:
            known = ", ".join(sorted(k for k in prompt_dictionary if "-" in k))
            raise ManifestError(f"{where}: the model has no locale {lang!r} (it knows {known})")
        lines += 1
        seconds += float(row["duration"])
        langs[lang] = langs.get(lang, 0) + 1
    if not lines:
        raise ManifestError(f"{name}: no lines; export some reviewed clips first (earmark export)")
    return {"lines": lines, "hours": seconds / 3600, "languages": dict(sorted(langs.items()))}


def data_config(
    manifests: Sequence[str],
    model: Any,
    settings: TrainSettings,
    *,
    train: bool,
    mix: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The ``train_ds`` / ``validation_ds`` config of the Lhotse prompt dataset. ``mix`` gives
    each manifest's share of the samples (Lhotse's default is proportional to their sizes,
    which drowns a small set of corrections in a large replay set)."""
    defaults = model.cfg.model_defaults
    if mix is not None and len(manifests) > 1:
        # NeMo 3.0 reads [[path, weight], ...] for tarred data only; input_cfg weights any source
        sources: dict[str, Any] = {
            "input_cfg": [
                {"type": "nemo", "manifest_filepath": m, "weight": float(w)}
                for m, w in zip(manifests, mix, strict=True)
            ]
        }
    else:
        sources = {"manifest_filepath": list(manifests) if len(manifests) > 1 else manifests[0]}
    return {
        "use_lhotse": True,
        **sources,
        "sample_rate": int(model.cfg.sample_rate),
        "lang_field": "target_lang",
        "prompt_dictionary": dict(defaults.prompt_dictionary),
        "num_prompts": int(defaults.get("num_prompts", 128)),
        "default_prompt_mode": "unified" if train else "langID",
        "unified_auto_ratio": settings.unified_auto_ratio,
        "batch_duration": settings.batch_seconds,
        "max_duration": settings.max_duration,
        "shuffle": train,
        "shuffle_buffer_size": 10_000,
        "seed": settings.seed,
        "shard_seed": "randomized" if train else settings.seed,
        "force_finite": not train,
        "num_workers": 0,
        "pin_memory": False,
    }


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


class VectorisedRNNTLoss(torch.nn.Module):
    """NeMo's ``RNNTLoss`` interface (``reduction='mean_batch'``) over :func:`asr.losses.rnnt_loss`."""

    def __init__(self, blank: int) -> None:
        super().__init__()
        self.blank = blank

    def forward(
        self,
        *,
        log_probs: torch.Tensor,
        targets: torch.Tensor,
        input_lengths: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> torch.Tensor:
        from asr.losses import rnnt_loss

        # The joint's CPU output is already log-softmaxed; log_softmax again is the identity.
        return rnnt_loss(log_probs, targets, input_lengths, target_lengths, blank=self.blank).mean()


def prepare_model(model: Any, settings: TrainSettings, *, on_gpu: bool) -> None:
    """Freeze what ``settings.freeze`` says and swap in the CPU loss; call before ``setup_optimization``."""
    model.train()
    if settings.freeze == "encoder":
        model.encoder.freeze()
        model.preprocessor.freeze()
    elif settings.freeze == "decoder":
        model.decoder.freeze()
    if not on_gpu:
        model.loss = VectorisedRNNTLoss(blank=model.tokenizer.vocab_size)  # RNNT BPE: blank is the last id
        if model.joint.fuse_loss_wer:
            model.joint.set_loss(model.loss)
    # NeMo decodes a training batch every log_every_n_steps for a batch WER: not worth it here.
    model.cfg.log_prediction = False


def merge_into(model: Any, base_state: dict[str, torch.Tensor], weight: float) -> None:
    """``model <- (1 - weight) * base + weight * model`` for every floating-point tensor."""
    if weight >= 1.0:
        return
    state = model.state_dict()
    merged = {
        k: (base_state[k].to(v.device) * (1 - weight) + v * weight) if v.is_floating_point() and k in base_state else v
        for k, v in state.items()
    }
    model.load_state_dict(merged)


def epochs_for(settings: TrainSettings) -> int:
    return math.ceil(settings.max_steps / settings.steps_per_epoch)

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
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

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
    #: Audio seconds per batch (Lhotse's dynamic batches).
    batch_seconds: float = 45.0
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


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


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
    elif settings.freeze == "head":
        for module in (model.decoder, model.joint, model.prompt_kernel):
            module.requires_grad_(False)
    if not on_gpu:
        model.loss = VectorisedRNNTLoss(blank=model.tokenizer.vocab_size)  # RNNT BPE: blank is the last id
        if model.joint.fuse_loss_wer:
            model.joint.set_loss(model.loss)
    # NeMo decodes a training batch every log_every_n_steps for a batch WER: not worth it here.
    model.cfg.log_prediction = False


def attach_anchor(model: Any, base: Any, weight: float, *, at: str = "output") -> None:
    """Add the function-space anchor of :attr:`TrainSettings.anchor` to ``model``'s training loss.

    ``base`` (the base model, restored a second time) runs on the replay clips of each batch;
    the loss gains ``weight`` x, at ``output``, the KL divergence of the trained model's output
    distribution from the base's, averaged over the valid (frame, token) points of the RNN-T
    lattice; at ``encoder``, the mean squared distance of the encoder's output over valid frames.
    Call after ``prepare_model`` and before ``setup_training_data`` (the training batches then
    carry which clips are replay)."""
    from nemo.collections.asr.data import audio_to_text_lhotse_prompt_index as prompt_data
    from nemo.collections.asr.models import rnnt_bpe_models_prompt as prompt_model

    # ``base`` stays off ``model``'s module tree: not trained, not saved, not synchronised by DDP.
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    seen: dict[str, Any] = {}
    forward, joint_forward, training_step = model.forward, model.joint.forward, model.training_step

    class AnchoredPromptDataset(prompt_data.LhotseSpeechToTextBpeDatasetWithPromptIndex):
        """NeMo's prompt dataset plus a last tensor: which clips of the batch are replay."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            load = self.load_audio

            def load_and_keep(cuts: Any) -> Any:  # the cuts that loaded, in batch order
                audio, lens, kept = load(cuts)
                self._kept = kept
                return audio, lens, kept

            self.load_audio = load_and_keep

        def __getitem__(self, cuts: Any) -> tuple[torch.Tensor, ...]:
            batch = super().__getitem__(cuts)
            replay = torch.tensor([bool(getattr(c, ANCHOR_TAG, False)) for c in self._kept], dtype=torch.bool)
            return (*batch, replay)

    def remembering_forward(*args: Any, **kwargs: Any) -> Any:
        state = random.getstate()
        out = forward(*args, **kwargs)
        if model.training:
            # In training the cache-aware encoder draws one of its latency modes per batch
            # (random.choices); draw it again from the same state so the base uses the same.
            encoder, after = model.encoder, random.getstate()
            random.setstate(state)
            if len(encoder.att_context_size_all) > 1:
                context = random.choices(encoder.att_context_size_all, weights=encoder.att_context_probs)[0]
            else:
                context = encoder.att_context_size
            random.setstate(after)
            seen["encoded"], seen["context"] = out, context
        return out

    def remembering_joint(*args: Any, **kwargs: Any) -> Any:
        out = joint_forward(*args, **kwargs)
        if model.training and "joint" not in seen:  # the loss's call, not a decoding one
            seen["joint"] = out
        return out

    def anchored_step(batch: Any, batch_idx: int) -> Any:
        *batch, replay = batch
        seen.pop("joint", None)
        out = training_step(tuple(batch), batch_idx)
        (encoded, encoded_len), context, joint = seen.pop("encoded"), seen.pop("context"), seen.pop("joint", None)
        if not replay.any():
            return out
        signal, signal_len, transcript, transcript_len, prompts = (x[replay] for x in batch)
        lengths = encoded_len[replay]
        with torch.no_grad():
            base.encoder.set_default_att_context_size(context)
            target, _ = base.forward(input_signal=signal, input_signal_length=signal_len, prompt_indices=prompts)
            if at == "output":
                decoded, _, _ = base.decoder(targets=transcript, target_length=transcript_len)
                target = base.joint(encoder_outputs=target, decoder_outputs=decoded).log_softmax(-1)
        if at == "output":  # KL(base || model) at every (frame, token) point of the lattice
            mine = joint[replay].log_softmax(-1)
            distance = (target.exp() * (target - mine)).sum(-1)  # B x T x U+1
            tokens = torch.arange(distance.shape[2], device=distance.device)
            valid = _frames(lengths, distance.shape[1])[:, :, None] & (
                tokens[None, None, :] <= transcript_len[:, None, None]
            )
        else:  # squared distance of the encoder outputs (B x D x T), per frame
            distance = ((encoded[replay] - target) ** 2).mean(dim=1)
            valid = _frames(lengths, distance.shape[1])
        penalty = (distance * valid).sum() / valid.sum().clamp(min=1)
        out["loss"] = out["loss"] + weight * penalty
        out["anchor_distance"] = penalty.detach()
        # per epoch, into the reported checkpoint metrics (and the card): how far replay moved
        model.log("train_anchor_distance", penalty.detach(), on_step=False, on_epoch=True, batch_size=int(replay.sum()))
        return out

    model.forward = remembering_forward
    if at == "output":
        model.joint.forward = remembering_joint
    model.training_step = anchored_step
    model._setup_dataloader_from_config = _with_dataset(
        model._setup_dataloader_from_config, prompt_model, AnchoredPromptDataset
    )


def _frames(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """B x ``frames`` mask of the valid frames of each clip."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


def _with_dataset(setup: Any, module: Any, dataset_class: type) -> Any:
    """``setup`` (NeMo's dataloader factory) building training sets with ``dataset_class``."""

    def wrapped(config: Any) -> Any:
        if not config.get("shuffle"):  # validation: NeMo's own dataset
            return setup(config)
        original = module.LhotseSpeechToTextBpeDatasetWithPromptIndex
        module.LhotseSpeechToTextBpeDatasetWithPromptIndex = dataset_class
        try:
            return setup(config)
        finally:
            module.LhotseSpeechToTextBpeDatasetWithPromptIndex = original

    return wrapped


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

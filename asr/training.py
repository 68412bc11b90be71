"""Fine-tuning the prompt model with NeMo and Lightning: the loss, freezing, the anchor, merging
(no Ray here; the settings and data configs are in :mod:`asr.train_settings`).

``jobs/finetune.py`` runs this on Ray Train workers; everything here also runs in one plain
process, which is how it is tested without a cluster.

* **Loss**: on CPU NeMo's numba RNN-T loss costs ~5 s a batch; :class:`VectorisedRNNTLoss`
  (``asr.losses``, the same value to float precision) replaces it there. GPUs keep NeMo's.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from asr.train_settings import ANCHOR_TAG, TrainSettings


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
            load: Any = getattr(self, "load_audio")  # noqa: B009 - NeMo's attribute, typed Any here

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

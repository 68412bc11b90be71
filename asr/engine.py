"""The offline engine: batched transcription with a language per clip.

>>> from asr import Transcriber, decode_audio
>>> engine = Transcriber.load("demo")                                   # doctest: +SKIP
>>> [t.text for t in engine.transcribe([decode_audio("a.wav")], langs=["auto"])]   # doctest: +SKIP
['Hola amigo.']

Every clip gets its own prompt: the batch goes through ``model.forward(..., prompt_indices=...)``
and the RNN-T greedy decoder, never NeMo's file-path ``transcribe()`` (which ignores
``target_lang`` for this model class in NeMo 3.0.0).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from asr.loaded import LoadedModel
from asr.model import AUTO
from asr.results import Transcript
from asr.tokens import as_list, blank_confidence, build_transcript

if TYPE_CHECKING:
    from asr.streaming import CachePool, StreamingSession

log = logging.getLogger(__name__)

#: Shortest audio the encoder accepts: shorter clips are padded with silence.
MIN_SAMPLES = 1_600


@dataclass(frozen=True, slots=True)
class TranscribeOptions:
    """How to transcribe; shared by the CLI, the batch job and the server."""

    #: ``auto`` (the model detects the language, per sentence) or a locale such as ``de-DE``.
    lang: str = AUTO
    #: Attention context ``(left, right)``, e.g. ``(56, 13)``; None = the model's default.
    #: The right context sets the latency mode: 0, 1, 3, 6, 13 -> 80/160/320/560/1120 ms chunks.
    att_context: tuple[int, int] | None = None
    #: Padded audio seconds per forward pass (clips are sorted by length and packed); None picks
    #: by device: 60 s on CPU (measured fastest here: 40-100 s run 1.5x faster than 300 s, caches
    #: stay warm) and 600 s on a GPU (fills it).
    batch_seconds: float | None = None
    #: Most clips per forward pass.
    max_batch_size: int = 64


class Transcriber(LoadedModel):
    """One loaded model and the verbs that use it (:meth:`transcribe`, :meth:`stream`).
    Not thread-safe: one per actor/worker."""

    # -- offline -------------------------------------------------------------------------

    def batch_seconds(self, options: TranscribeOptions) -> float:
        if options.batch_seconds is not None:
            return options.batch_seconds
        return 60.0 if self.device == "cpu" else 600.0

    def transcribe(
        self,
        audios: Sequence[np.ndarray],
        *,
        langs: Sequence[str] | None = None,
        options: TranscribeOptions | None = None,
    ) -> list[Transcript]:
        """Transcribe 16 kHz mono float32 arrays; ``langs`` gives one language per clip.

        Clips are sorted by length and packed into forward passes of at most
        ``options.batch_seconds`` padded seconds; results come back in input order.
        """
        options = options or TranscribeOptions()
        langs = list(langs) if langs is not None else [options.lang] * len(audios)
        if len(langs) != len(audios):
            raise ValueError(f"got {len(audios)} clips but {len(langs)} languages; pass one language per clip")
        indices = self.prompt_indices(langs)
        requested = [self.requested_lang(lang) for lang in langs]
        results: list[Transcript | None] = [None] * len(audios)
        with self.running(options.att_context) as att:
            for batch in pack_by_length(
                [len(a) for a in audios], self.batch_seconds(options) * self.info.sample_rate, options.max_batch_size
            ):
                outs = self._transcribe_batch(
                    [audios[i] for i in batch], [indices[i] for i in batch], [requested[i] for i in batch], att
                )
                for i, out in zip(batch, outs, strict=True):
                    results[i] = out
        return [r for r in results if r is not None]

    def _transcribe_batch(
        self, audios: list[np.ndarray], prompts: list[int], requested: list[str], att: tuple[int, int]
    ) -> list[Transcript]:
        import torch

        with torch.inference_mode():
            feats, feat_lens = self._features(audios)
            kwargs: dict[str, Any] = {"processed_signal": feats, "processed_signal_length": feat_lens}
            if self.info.uses_prompts:
                kwargs["prompt_indices"] = torch.tensor(prompts, dtype=torch.long, device=self.device)
            enc, enc_len = self.model.forward(**kwargs)
            hyps = self.model.decoding.rnnt_decoder_predictions_tensor(
                encoder_output=enc, encoded_lengths=enc_len, return_hypotheses=True
            )
        return [
            self.hypothesis_to_transcript(
                hyp, lang_requested=req, duration_s=len(audio) / self.info.sample_rate, att=att
            )
            for hyp, audio, req in zip(hyps, audios, requested, strict=True)
        ]

    def _features(self, audios: list[np.ndarray]) -> tuple[Any, Any]:
        """Log-mel features clip by clip, then padded into one batch.

        Computing them on the padded batch would let the padding leak into each clip's last
        frames (the STFT window at the end reads zeros instead of the clip's own reflection), so
        a clip's text could depend on which clips share its batch. Clip by clip, the result of a
        clip is the same in any batch: what the batch job and the engine alone return agree.
        """
        import torch

        pre = self.model.preprocessor
        out, lens = [], []
        for audio in audios:
            n = max(len(audio), MIN_SAMPLES)
            x = torch.zeros(1, n, dtype=torch.float32)
            x[0, : len(audio)] = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
            f, fl = pre(input_signal=x.to(self.device), length=torch.tensor([n], device=self.device))
            out.append(f[0, :, : int(fl[0])])
            lens.append(int(fl[0]))
        feats = torch.zeros(len(out), out[0].shape[0], max(lens), dtype=out[0].dtype, device=self.device)
        for row, f in enumerate(out):
            feats[row, :, : f.shape[1]] = f
        return feats, torch.tensor(lens, dtype=torch.long, device=self.device)

    def hypothesis_to_transcript(
        self, hyp: Any, *, lang_requested: str, duration_s: float, att: tuple[int, int], frame_offset: int = 0
    ) -> Transcript:
        ids = as_list(hyp.y_sequence)
        frames = [f + frame_offset for f in as_list(hyp.timestamp)] if ids else []
        return build_transcript(
            token_ids=ids,
            frames=frames,
            confidences=as_list(hyp.token_confidence) if hyp.token_confidence is not None else None,
            tokenizer=self.model.tokenizer,
            frame_shift_s=self.info.frame_shift_s,
            lang_requested=lang_requested,
            duration_s=duration_s,
            model_id=self.info.model_id,
            att_context=att,
            empty_confidence=blank_confidence(hyp),
        )

    # -- streaming -----------------------------------------------------------------------

    def stream(
        self, *, lang: str = AUTO, att_context: Sequence[int] | None = None, pool: CachePool | None = None
    ) -> StreamingSession:
        """A cache-aware streaming session; feed it PCM chunks of any size. With ``pool`` its
        encoder caches live in a slot of that :class:`~asr.streaming.CachePool`."""
        from asr.streaming import StreamingSession

        return StreamingSession(self, lang=lang, att_context=att_context, pool=pool)


def pack_by_length(lengths: Sequence[int], budget_samples: float, max_batch: int) -> list[list[int]]:
    """Indices grouped into batches: sorted by length, each batch's padded size within budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max(lengths[i], MIN_SAMPLES)
        if current and (longest * (len(current) + 1) > budget_samples or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches

"""Cache-aware streaming: feed PCM of any size, get partial text per model chunk, final text at the end.

>>> session = engine.stream(lang="auto", att_context=(56, 3))     # doctest: +SKIP
>>> for pcm in microphone_chunks():                               # doctest: +SKIP
...     update = session.feed(pcm)
...     print(update.text)
>>> final = session.finish()                                      # doctest: +SKIP

Four things make a live session differ from NeMo's ``CacheAwareStreamingAudioBuffer``
(a simulator over whole files):

* **Incremental features.** Each feed computes log-mel frames only for the new audio plus a
  fixed left context of two hops, so a chunk costs the same at second 1 and second 300. Frames
  are cut so that each one's STFT window and pre-emphasis see exactly the samples they see
  offline: the features equal the whole-utterance features bit for bit.
* **Per-row prompts.** The language prompt is applied to this session's rows only (a one-hot
  per row through ``prompt_kernel``, as ``forward`` does), never through the model-wide
  ``set_inference_prompt``; sessions in different languages can share a model and a batch
  (:func:`step_sessions`).
* **No zero-padded pre-encode cache.** While the stream is shorter than the pre-encoder's cache
  (at 56,0 the first chunk is a single frame), the pre-encoder runs over the whole stream so far
  and drops the frames it already emitted, as the offline pass sees them, instead of reading
  zero features before the start: that keeps 56,0 equal to offline too.
* **End-of-stream flush.** :meth:`StreamingSession.finish` runs the last partial chunk with
  ``keep_all_outputs`` instead of dropping it, so the final text equals offline text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from asr.loaded import LoadedModel
from asr.model import AUTO
from asr.results import Transcript
from asr.tokens import as_list, build_transcript
from records.text import strip_tags

HOP = 160
WIN_HALF = 256  # n_fft // 2: a centred STFT frame j reads samples [j*HOP - 256, j*HOP + 256)


@dataclass(frozen=True, slots=True)
class StreamUpdate:
    """What a session knows after a feed: the text so far and how much audio it has decoded."""

    text: str
    decoded_s: float
    chunks: int


class StreamingSession:
    """One live stream. Not thread-safe; feed it from one task at a time."""

    def __init__(self, engine: LoadedModel, *, lang: str = AUTO, att_context: Sequence[int] | None = None) -> None:
        import torch

        self.engine = engine
        model = engine.model
        if not hasattr(model.encoder, "cache_aware_stream_step"):
            raise ValueError(f"{engine.info.name} has no cache-aware streaming encoder")
        self.att_context = engine.resolve_att_context(att_context)
        self.lang = engine.requested_lang(lang)
        self.prompt = engine.prompt_indices([lang])[0]
        with engine.running(self.att_context):
            self.cfg = model.encoder.streaming_cfg
            cache = model.encoder.get_initial_cache_state(batch_size=1)
        self._cache = tuple(c.to(engine.device) if c is not None else None for c in cache)
        feat = model.preprocessor.featurizer
        if getattr(feat, "n_fft", 512) != 2 * WIN_HALF or getattr(feat, "hop_length", HOP) != HOP:
            raise ValueError("streaming supports 25 ms windows with a 10 ms hop (n_fft 512) only")
        self._torch = torch
        # audio not yet turned into features: samples from absolute index _s0 on
        self._audio = np.zeros(0, np.float32)
        self._s0 = 0
        self._received = 0
        self._next_frame = 0
        # features not yet consumed by the encoder, and the pre-encode cache before them
        self._features = torch.zeros(int(model.cfg.preprocessor.features), 0)
        self._pre_cache: Any = None
        # the decoder's state, and every token decoded so far (ids, encoder frames, confidences)
        self._dec_state: Any = None
        self._ids: list[int] = []
        self._frames: list[int] = []
        self._confs: list[float] = []
        self._frames_out = 0
        self.chunks = 0
        self.finished = False
        self._closed = False

    # -- public --------------------------------------------------------------------------

    def feed(self, pcm: np.ndarray, *, run: bool = True) -> StreamUpdate:
        """Add 16 kHz mono float32 samples; runs every model chunk that is now complete.

        With ``run=False`` only features are computed; a caller batching many sessions then
        steps them together with :func:`step_ready`.
        """
        if self.finished:
            raise RuntimeError("this session is finished; start a new one with Transcriber.stream()")
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size and not np.isfinite(pcm).all():
            raise ValueError("audio chunk holds NaN or inf samples; send finite float32 PCM in [-1, 1]")
        self._audio = np.concatenate([self._audio, pcm])
        self._received += pcm.size
        self._extract_features(final=False)
        if run:
            while self.ready():
                step_sessions([self])
        return self.update()

    def finish(self) -> Transcript:
        """Flush the rest of the audio; returns the final transcript (equal to offline)."""
        if not self.finished:
            self.close_input()
            while self.ready():
                step_sessions([self])
            self.finished = True
        return self.transcript()

    def close_input(self) -> None:
        """No more audio will come: the last partial frames and chunk become ready."""
        if not self._closed:
            self._closed = True
            self._extract_features(final=True)

    def ready(self) -> bool:
        """Whether a model chunk can run now."""
        return self._ready_chunk() is not None

    # -- features ------------------------------------------------------------------------

    def _extract_features(self, *, final: bool) -> None:
        torch = self._torch
        total = self._received
        # offline has total // HOP frames; frame j is final once samples up to j*HOP + WIN_HALF exist
        last = total // HOP - 1 if final else (total - WIN_HALF) // HOP
        if last < self._next_frame or self._audio.size == 0:
            return
        x = torch.from_numpy(self._audio).unsqueeze(0).to(self.engine.device)
        with torch.inference_mode():
            feats, _ = self.engine.model.preprocessor(
                input_signal=x, length=torch.tensor([x.shape[1]], device=x.device)
            )
        local0 = self._s0 // HOP
        new = feats[0, :, self._next_frame - local0 : last - local0 + 1].to("cpu")
        self._features = torch.cat([self._features, new], dim=1)
        self._next_frame = last + 1
        # keep audio from two hops before the next frame's window (see the module docstring)
        keep_from = max(0, (self._next_frame - 2) * HOP)
        if keep_from > self._s0:
            self._audio = self._audio[keep_from - self._s0 :]
            self._s0 = keep_from

    # -- chunks --------------------------------------------------------------------------

    def _sizes(self) -> tuple[int, int, int]:
        """(chunk frames, pre-encode cache frames, extra pre-encoded frames to drop) for the next step."""
        first = self.chunks == 0

        def pick(v: Any) -> int:
            return int(v[0] if first else v[1]) if isinstance(v, list | tuple) else int(v)

        size, cache = pick(self.cfg.chunk_size), pick(self.cfg.pre_encode_cache_size)
        drop = 0 if first else int(self.cfg.drop_extra_pre_encoded)
        have = 0 if self._pre_cache is None else int(self._pre_cache.shape[1])
        if cache and have < cache:
            # Fewer real frames so far than the pre-encode cache holds (at 56,0 the first chunk is
            # one frame): run the pre-encoder over the whole stream so far, as the offline pass
            # does with its own causal padding, and drop the frames it already emitted. Padding
            # the cache with zero features instead would feed the causal convolutions values the
            # offline pass never sees, and the output would drift from offline.
            drop = self._frames_out
        return size, cache, drop

    def _ready_chunk(self) -> int | None:
        size, _, _ = self._sizes()
        have = self._features.shape[1]
        if have >= size:
            return size
        if self._closed and have > 0:
            return have
        return None

    def _take_chunk(self) -> tuple[Any, int, bool]:
        torch = self._torch
        size = self._ready_chunk()
        if size is None:
            raise RuntimeError("no model chunk is ready for this session")
        _, cache_frames, drop = self._sizes()
        chunk = self._features[:, :size]
        self._features = self._features[:, size:]
        is_last = self._closed and self._features.shape[1] == 0
        if cache_frames:
            pre = self._pre_cache if self._pre_cache is not None else torch.zeros(chunk.shape[0], 0)
            full = torch.cat([pre[:, -cache_frames:], chunk], dim=1)  # the whole history when shorter (see _sizes)
        else:
            full = chunk
        history = chunk if self._pre_cache is None else torch.cat([self._pre_cache, chunk], dim=1)
        self._pre_cache = history[:, -max(1, int(_max_pre_cache(self.cfg))) :]
        return full, drop, is_last

    def update(self) -> StreamUpdate:
        """The text so far (cheap: one tokenizer call); :meth:`transcript` has words and times."""
        text = strip_tags(self.engine.model.tokenizer.ids_to_text(self._ids)) if self._ids else ""
        return StreamUpdate(text, self._frames_out * self.engine.info.frame_shift_s, self.chunks)

    def transcript(self) -> Transcript:
        """Everything decoded so far as a :class:`Transcript` (sentences, words, confidences)."""
        return build_transcript(
            token_ids=self._ids,
            frames=self._frames,
            confidences=self._confs,
            tokenizer=self.engine.model.tokenizer,
            frame_shift_s=self.engine.info.frame_shift_s,
            lang_requested=self.lang,
            duration_s=self._received / self.engine.info.sample_rate,
            model_id=self.engine.info.model_id,
            att_context=self.att_context,
        )


def _max_pre_cache(cfg: Any) -> int:
    v = cfg.pre_encode_cache_size
    return int(max(v)) if isinstance(v, list | tuple) else int(v)


def step_ready(sessions: Sequence[StreamingSession]) -> int:
    """Run one chunk for every session that has one ready, batching those that can share a
    forward pass (same latency mode, same phase, same last-chunk status). Returns how many ran."""
    groups: dict[tuple, list[StreamingSession]] = {}
    for s in sessions:
        if not s.finished and s.ready():
            size, _, drop = s._sizes()
            last = s._closed and s._features.shape[1] <= size
            groups.setdefault((s.att_context, s.chunks == 0, drop, last, id(s.engine)), []).append(s)
    for group in groups.values():
        step_sessions(group)
    return sum(len(g) for g in groups.values())


def transcribe_streaming(
    engine: LoadedModel,
    audios: Sequence[np.ndarray],
    *,
    langs: Sequence[str],
    att_context: Sequence[int] | None = None,
    feed_samples: int = 1280,
) -> list[Transcript]:
    """Stream many clips at once, ``feed_samples`` at a time, stepping them in shared batches."""
    sessions = [StreamingSession(engine, lang=lang, att_context=att_context) for lang in langs]
    positions = [0] * len(audios)
    while not all(s.finished for s in sessions):
        for i, (s, audio) in enumerate(zip(sessions, audios, strict=True)):
            if s.finished or s._closed:
                continue
            s.feed(audio[positions[i] : positions[i] + feed_samples], run=False)
            positions[i] += feed_samples
            if positions[i] >= len(audio):
                s.close_input()
        while step_ready(sessions):
            pass
        for s in sessions:
            if s._closed and not s.ready():
                s.finished = True
    return [s.transcript() for s in sessions]


def step_sessions(sessions: Sequence[StreamingSession]) -> None:
    """Run one model chunk for each session, batched: sessions may differ in language.

    Sessions batched together must share a latency mode and be at the same phase (first
    chunk or not); the caller groups them, or passes one session.
    """
    if not sessions:
        return
    engine = sessions[0].engine
    torch = sessions[0]._torch
    model = engine.model
    att = sessions[0].att_context
    if any(s.engine is not engine or s.att_context != att for s in sessions):
        raise ValueError("sessions stepped together must share an engine and a latency mode")
    taken = [s._take_chunk() for s in sessions]
    drops = {d for _, d, _ in taken}
    if len(drops) != 1:
        raise ValueError("sessions stepped together must be at the same phase (first chunk or not)")
    drop = drops.pop()
    lasts = {last for _, _, last in taken}
    if len(lasts) != 1:
        raise ValueError("a stream's last chunk cannot share a batch with other streams' middle chunks")
    keep_all = lasts.pop()
    lengths = torch.tensor([c.shape[1] for c, _, _ in taken])
    x = torch.zeros(len(sessions), taken[0][0].shape[0], int(lengths.max()))
    for row, (c, _, _) in enumerate(taken):
        x[row, :, : c.shape[1]] = c
    dev = engine.device
    caches = [torch.cat([s._cache[k] for s in sessions], dim=1 if k < 2 else 0).to(dev) for k in range(3)]
    prompts = torch.tensor([s.prompt for s in sessions], dtype=torch.long, device=dev)
    from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis

    with engine.running(att), torch.inference_mode():
        enc, enc_len, c_ch, c_t, c_len = model.encoder.cache_aware_stream_step(
            processed_signal=x.to(dev),
            processed_signal_length=lengths.to(dev),
            cache_last_channel=caches[0],
            cache_last_time=caches[1],
            cache_last_channel_len=caches[2],
            keep_all_outputs=keep_all,
            drop_extra_pre_encoded=drop,
        )
        if engine.info.uses_prompts:
            enc = apply_prompts(model, enc, prompts)
        # Fresh hypotheses that carry only the decoder state: NeMo then returns just this chunk's
        # tokens (with absolute frame indices), and nothing is re-decoded or re-scored, so a
        # step costs the same at minute 5 as at second 1.
        previous = None
        if sessions[0]._dec_state is not None:
            previous = [
                Hypothesis(score=0.0, y_sequence=None, dec_state=s._dec_state, timestamp=None) for s in sessions
            ]
        hyps = model.decoding.rnnt_decoder_predictions_tensor(
            encoder_output=enc, encoded_lengths=enc_len, return_hypotheses=True, partial_hypotheses=previous
        )
    for row, s in enumerate(sessions):
        s._cache = (c_ch[:, row : row + 1], c_t[:, row : row + 1], c_len[row : row + 1])
        hyp = hyps[row]
        s._dec_state = hyp.dec_state
        ids = as_list(hyp.y_sequence)
        s._ids += ids
        s._frames += as_list(hyp.timestamp)[: len(ids)]
        confs = as_list(hyp.token_confidence)
        s._confs += confs if len(confs) == len(ids) else [1.0] * len(ids)
        s._frames_out += int(enc_len[row])
        s.chunks += 1


def apply_prompts(model: Any, encoded: Any, prompt_indices: Any) -> Any:
    """Condition encoder output [B, D, T] on one prompt per row, exactly as the model's forward does."""
    import torch

    enc = encoded.transpose(1, 2)
    batch, frames, _ = enc.shape
    one_hot = torch.zeros(batch, frames, model.num_prompts, dtype=enc.dtype, device=enc.device)
    one_hot.scatter_(2, prompt_indices.view(batch, 1, 1).expand(-1, frames, -1), 1.0)
    out = model.prompt_kernel(torch.cat([enc, one_hot], dim=-1)).to(enc.dtype)
    return out.transpose(1, 2)

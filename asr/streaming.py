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

And one thing makes many sessions on one model cheap:

* **A cache pool.** Sessions created with a :class:`CachePool` keep only a slot number; the
  encoder caches of every stream live in three preallocated tensors on the model's device.
  :func:`step_sessions` reads a batch's caches as a view when its slots are one contiguous range
  (the pool hands out the lowest free slot, so they often are) or with ``index_select``, and writes
  the new caches back in place: no per-session tensors, no ``torch.cat`` of every cache each step.
  Sessions without a pool keep their own caches, as before.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from asr.loaded import LoadedModel
from asr.model import AUTO
from asr.results import Transcript
from asr.tokens import as_list, build_transcript
from records.text import strip_tags

log = logging.getLogger(__name__)

HOP = 160
WIN_HALF = 256  # n_fft // 2: a centred STFT frame j reads samples [j*HOP - 256, j*HOP + 256)


@dataclass(frozen=True, slots=True)
class StreamUpdate:
    """What a session knows after a feed: the text so far and how much audio it has decoded."""

    text: str
    decoded_s: float
    chunks: int


class CachePool:
    """Encoder caches for many streams, preallocated on the model's device: one slot per stream.

    >>> pool = CachePool(engine, slots=64)                              # doctest: +SKIP
    >>> session = engine.stream(lang="de-DE", pool=pool)                # doctest: +SKIP

    ``caches``: ``cache_last_channel`` [layers, slots, left, d_model], ``cache_last_time``
    [layers, slots, d_model, conv] and ``cache_last_channel_len`` [slots], from the encoder's
    initial state. Their shapes depend on the left context only, so one pool serves every latency
    mode whose caches have the same shapes (``modes``; on the Nemotron models and the demo model
    all of them, left 56). A full pool doubles (``grow=True``): one reallocation and copy, between
    steps; a hard cap would fail a stream on a brief overlap (a turn ending as the next opens),
    and capping streams is the server's admission control (``--max-sessions``). With
    ``grow=False`` a full pool raises. Not thread-safe: use it from the thread that steps.
    """

    def __init__(
        self, engine: LoadedModel, slots: int, *, att_context: Sequence[int] | None = None, grow: bool = True
    ) -> None:
        import torch

        if slots < 1:
            raise ValueError(f"a cache pool needs at least one slot (got {slots})")
        if not hasattr(engine.model.encoder, "get_initial_cache_state"):
            raise ValueError(f"{engine.info.name} has no cache-aware streaming encoder")
        self.engine, self.grow = engine, grow
        att = engine.resolve_att_context(att_context)
        initial: dict[tuple[int, int], tuple[Any, ...]] = {}
        for mode in dict.fromkeys([att, *engine.info.att_context_sizes]):
            with engine.running(mode):
                initial[mode] = engine.model.encoder.get_initial_cache_state(1, device=torch.device(engine.device))
            if any(c is None for c in initial[mode]):
                raise ValueError(f"{engine.info.name} keeps no encoder caches in mode {mode}; a pool needs them")
        shape = [tuple(c.shape) for c in initial[att]]
        #: the latency modes whose sessions may use this pool
        self.modes = tuple(m for m, init in initial.items() if [tuple(c.shape) for c in init] == shape)
        self._initial = initial[att]
        self.caches: tuple[Any, ...] = ()
        self._free: list[int] = []  # a heap: the lowest free slot goes first, so live slots stay dense
        self._used: set[int] = set()
        self._resize(slots)

    @property
    def slots(self) -> int:
        """How many streams the pool holds now (in use or free)."""
        return len(self._free) + len(self._used)

    @property
    def in_use(self) -> int:
        return len(self._used)

    def serves(self, att_context: Sequence[int] | None) -> bool:
        """Whether sessions in latency mode ``att_context`` can keep their caches here."""
        return self.engine.resolve_att_context(att_context) in self.modes

    def acquire(self) -> int:
        """The lowest free slot, set to the initial cache state."""
        if not self._free:
            if not self.grow:
                raise RuntimeError(f"all {self.slots} cache slots are in use; close a session or use grow=True")
            self._resize(2 * self.slots)
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        for pooled, init in zip(self.caches, self._initial, strict=True):
            pooled.narrow(_batch_dim(pooled), slot, 1).copy_(init)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"cache slot {slot} is not in use; was it released twice?")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

    def gather(self, slots: Sequence[int]) -> tuple[Any, ...]:
        """The caches of ``slots``, rows in that order: a view when they are one ascending range."""
        start, index = self._where(slots)
        if index is None:
            return tuple(c.narrow(_batch_dim(c), start, len(slots)) for c in self.caches)
        return tuple(c.index_select(_batch_dim(c), index) for c in self.caches)

    def scatter(self, slots: Sequence[int], caches: Sequence[Any]) -> None:
        """Write a step's new caches (rows in the order of ``slots``) back into the pool."""
        start, index = self._where(slots)
        for pooled, new in zip(self.caches, caches, strict=True):
            if index is None:
                pooled.narrow(_batch_dim(pooled), start, len(slots)).copy_(new)
            else:
                pooled.index_copy_(_batch_dim(pooled), index, new.to(pooled.dtype))

    def _where(self, slots: Sequence[int]) -> tuple[int, Any]:
        """(first slot, None) for one ascending run of slots, else (0, an index tensor)."""
        import torch

        if all(s == slots[0] + i for i, s in enumerate(slots)):
            return slots[0], None
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one batch")
        return 0, torch.tensor(list(slots), dtype=torch.long, device=self.caches[0].device)

    def _resize(self, slots: int) -> None:
        old, n = self.caches, self.slots
        grown = []
        for k, init in enumerate(self._initial):
            shape = list(init.shape)
            shape[_batch_dim(init)] = slots
            grown.append(init.expand(*shape).clone())
            if old:
                grown[-1].narrow(_batch_dim(init), 0, n).copy_(old[k])
        self.caches = tuple(grown)
        for slot in range(n, slots):
            heapq.heappush(self._free, slot)
        if old:
            log.info("cache pool grew from %d to %d slots", n, slots)


def _batch_dim(cache: Any) -> int:
    return 1 if cache.dim() > 1 else 0  # [layers, B, ...] for the two state caches, [B] for the lengths


class StreamingSession:
    """One live stream. Not thread-safe; feed it from one task at a time.

    With ``pool`` the session keeps its encoder caches in a slot of that :class:`CachePool`
    (released by :meth:`finish` or :meth:`close`); without, it holds its own.
    """

    def __init__(
        self,
        engine: LoadedModel,
        *,
        lang: str = AUTO,
        att_context: Sequence[int] | None = None,
        pool: CachePool | None = None,
    ) -> None:
        import torch

        self.engine = engine
        model = engine.model
        if not hasattr(model.encoder, "cache_aware_stream_step"):
            raise ValueError(f"{engine.info.name} has no cache-aware streaming encoder")
        self.att_context = engine.resolve_att_context(att_context)
        self.lang = engine.requested_lang(lang)
        self.prompt = engine.prompt_indices([lang])[0]
        if pool is not None and (pool.engine is not engine or not pool.serves(self.att_context)):
            raise ValueError(
                f"this cache pool serves modes {', '.join(f'{a},{b}' for a, b in pool.modes)} of its own model, "
                f"not {self.att_context[0]},{self.att_context[1]}: make a pool for that mode"
            )
        with engine.running(self.att_context):
            self.cfg = model.encoder.streaming_cfg
            cache = None if pool is not None else model.encoder.get_initial_cache_state(batch_size=1)
        self._cache: Any = (
            None if cache is None else tuple(c.to(engine.device) if c is not None else None for c in cache)
        )
        self.pool = pool
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
        #: this session's slot in ``pool`` (None without a pool, and once released)
        self.slot: int | None = pool.acquire() if pool is not None else None

    # -- public --------------------------------------------------------------------------

    def feed(self, pcm: np.ndarray, *, run: bool = True) -> StreamUpdate:
        """Add 16 kHz mono float32 samples; runs every model chunk that is now complete.

        With ``run=False`` only features are computed; a caller batching many sessions then
        steps them together with :func:`step_ready`.
        """
        if self.finished:
            raise RuntimeError("this session is finished or closed; start a new one with Transcriber.stream()")
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
            self._release()
        return self.transcript()

    def close(self) -> None:
        """Drop the stream without decoding the rest: frees its cache slot; no more feeds."""
        self.finished = True
        self._closed = True
        self._release()

    def _release(self) -> None:
        if self.pool is not None and self.slot is not None:
            self.pool.release(self.slot)
            self.slot = None

    def close_input(self) -> None:
        """No more audio will come: the last partial frames and chunk become ready."""
        if not self._closed:
            self._closed = True
            self._extract_features(final=True)

    @property
    def input_closed(self) -> bool:
        """No more audio will come (:meth:`close_input`, :meth:`finish` or :meth:`close` ran)."""
        return self._closed

    def ready(self) -> bool:
        """Whether a model chunk can run now."""
        return not self.finished and self._ready_chunk() is not None

    def batch_key(self) -> tuple | None:
        """Sessions with equal keys can share one :func:`step_sessions` call (same model, cache
        pool, latency mode, phase and last-chunk status); None when no chunk is ready."""
        if not self.ready():
            return None
        size, _, drop = self._sizes()
        last = self._closed and self._features.shape[1] <= size
        return (id(self.engine), id(self.pool), self.att_context, self.chunks == 0, drop, last)

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


def ready_groups(sessions: Sequence[StreamingSession], max_batch: int | None = None) -> list[list[StreamingSession]]:
    """The sessions that have a chunk ready, grouped into batches :func:`step_sessions` accepts
    (by :meth:`StreamingSession.batch_key`; languages mix freely), each at most ``max_batch``
    long and, with a pool, ordered by slot so that a batch is often one contiguous range."""
    groups: dict[tuple, list[StreamingSession]] = {}
    for s in sessions:
        key = s.batch_key()
        if key is not None:
            groups.setdefault(key, []).append(s)
    out = []
    for group in groups.values():
        group.sort(key=lambda s: -1 if s.slot is None else s.slot)
        size = max_batch or len(group)
        out += [group[i : i + size] for i in range(0, len(group), size)]
    return out


def step_ready(sessions: Sequence[StreamingSession]) -> int:
    """Run one chunk for every session that has one ready, batching those that can share a
    forward pass (:func:`ready_groups`). Returns how many ran."""
    groups = ready_groups(sessions)
    for group in groups:
        step_sessions(group)
    return sum(len(g) for g in groups)


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
    pool = sessions[0].pool
    if any(s.engine is not engine or s.att_context != att for s in sessions):
        raise ValueError("sessions stepped together must share an engine and a latency mode")
    if any(s.pool is not pool for s in sessions):
        raise ValueError("sessions stepped together must share one cache pool, or all have none")
    if any(s.finished for s in sessions):
        raise RuntimeError("a finished or closed session cannot be stepped")
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
    slots = [s.slot for s in sessions if s.slot is not None]  # every one, with a pool: none finished
    caches: Sequence[Any]
    if pool is not None:
        caches = pool.gather(slots)
    else:
        own: list[Any] = [s._cache for s in sessions]
        caches = [torch.cat([c[k] for c in own], dim=1 if k < 2 else 0).to(dev) for k in range(3)]
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
    if pool is not None:
        pool.scatter(slots, (c_ch, c_t, c_len))
    for row, s in enumerate(sessions):
        if pool is None:
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

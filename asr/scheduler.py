"""Many streams and offline work on one model, from one thread: :class:`StreamScheduler`.

>>> scheduler = StreamScheduler(engine)                                 # doctest: +SKIP
>>> scheduler.start()                                                   # doctest: +SKIP
>>> handle = scheduler.open(lang="auto", att_context=(56, 3))           # doctest: +SKIP
>>> for pcm in microphone_chunks():                                     # doctest: +SKIP
...     handle.append(pcm)                                              # returns at once
>>> handle.finish().result().text                                       # doctest: +SKIP
'Hola amigo.'
>>> scheduler.call(lambda: engine.transcribe([audio])).result()         # doctest: +SKIP

Any thread may open streams, append audio and queue calls; all model work (feature extraction,
encoder steps, decoding, queued calls) runs on the scheduler's one thread, ``earmark-model``, so
nothing contends for the model or its latency mode. The thread sleeps on a condition while there
is nothing to do (no polling), and each turn of its loop:

1. takes what the other threads sent (new streams, audio, ends, cancels) and turns the audio into
   features (``feed(run=False)``);
2. steps every stream that has a model chunk ready, one chunk each: batched, streams of one
   latency mode and phase share a forward pass whatever their languages (at most ``max_batch`` a
   pass), their encoder caches in a :class:`~asr.streaming.CachePool`; unbatched, one pass per
   stream (the baseline the benchmark compares with);
3. calls each stepped stream's ``on_update`` and resolves the streams that reached their end;
4. runs one queued :meth:`~StreamScheduler.call`, then goes round again.

So a queue of calls never holds streams back by more than one call, and busy streams never hold
a call back by more than one chunk each. A long call (a 30 s transcription batch) does delay
every stream's next chunk by its length: size offline batches with that in mind.

Failures stay where they happen: an exception in a step fails the streams of that step (their
``finish()`` futures carry it), one in a stream's ``on_update`` fails that stream, one in a call
fails that call; the thread goes on. :meth:`StreamScheduler.close` fails whatever is pending with
a RuntimeError.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import numpy as np

from asr.loaded import LoadedModel
from asr.model import AUTO
from asr.results import Transcript
from asr.streaming import CachePool, StreamingSession, StreamUpdate, ready_groups, step_sessions

log = logging.getLogger(__name__)

T = TypeVar("T")

OnUpdate = Callable[[Transcript, StreamUpdate], None]
State = Literal["open", "finishing", "done", "cancelled"]

THREAD_NAME = "earmark-model"


class StreamHandle:
    """One stream on a :class:`StreamScheduler`: feed it from any thread; it never blocks."""

    def __init__(
        self,
        scheduler: StreamScheduler,
        key: int,
        *,
        lang: str,
        att_context: tuple[int, int],
        on_update: OnUpdate | None,
    ) -> None:
        self.key = key
        self.lang = lang
        self.att_context = att_context
        self._scheduler = scheduler
        self._on_update = on_update
        self._future: concurrent.futures.Future[Transcript] = concurrent.futures.Future()
        # guarded by the scheduler's lock
        self._state: State = "open"
        self._audio: list[np.ndarray] = []
        self._appended = 0
        # written by the model thread only
        self._session: StreamingSession | None = None
        self._decoded_s = 0.0

    def append(self, pcm: np.ndarray) -> None:
        """Queue 16 kHz mono float32 samples for decoding; returns at once."""
        pcm = np.array(pcm, dtype=np.float32).reshape(-1)  # a copy: the caller may reuse its buffer
        if pcm.size and not np.isfinite(pcm).all():
            raise ValueError("audio chunk holds NaN or inf samples; send finite float32 PCM in [-1, 1]")
        with self._scheduler._cond:
            if self._state != "open":
                raise RuntimeError(f"this stream is {self._state}; open a new one for more audio")
            self._scheduler._check_open()
            self._audio.append(pcm)
            self._appended += pcm.size
            self._scheduler._notify(self)

    def pending_s(self) -> float:
        """Seconds of audio appended but not yet decoded by the model (this includes the model's
        look-ahead: the right context of the latency mode is decoded with the next chunk)."""
        return max(0.0, self._appended / self._scheduler.engine.info.sample_rate - self._decoded_s)

    def finish(self) -> concurrent.futures.Future[Transcript]:
        """No more audio: the future resolves with the final transcript (equal to offline for the
        same audio and mode). Calling it again returns the same future."""
        with self._scheduler._cond:
            if self._state == "open":
                self._state = "finishing"
                self._scheduler._notify(self)
        return self._future

    def cancel(self) -> None:
        """Drop the stream and its cache slot; its future, if anyone holds it, is cancelled."""
        with self._scheduler._cond:
            if self._state not in ("open", "finishing"):
                return
            self._state = "cancelled"
            self._audio.clear()
            self._scheduler._handles.pop(self.key, None)
            self._scheduler._notify(self)  # the model thread frees the slot
        self._future.cancel()


class StreamScheduler:
    """Every stream and every piece of offline work of one model replica, on one thread.

    ``batched=False`` steps each stream alone (the benchmark's baseline); ``max_batch`` caps the
    streams in one forward pass; ``slots`` sizes the cache pool (it doubles when full; admission
    control is the server's job). ``threads``: torch's intra-op threads for the model thread
    (None: the count torch has in the thread that calls :meth:`start`).

    Threads: the model thread sets its own count with ``torch.set_num_threads`` as it starts.
    The call is documented as process-wide, but with this torch build (OpenMP) the count is kept
    per thread once a thread has run torch work: measured with ``torch.get_num_threads`` in two
    threads, a count set in one (the server's turn detector sets 1 around its VAD steps on the
    event loop) did not change the other's. Work run through :meth:`call` that sets threads
    (``asr.vad``) does so on the model thread and restores them itself.
    """

    def __init__(
        self,
        engine: LoadedModel,
        *,
        batched: bool = True,
        max_batch: int = 64,
        slots: int = 64,
        threads: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        self.engine = engine
        self.batched = batched
        self.max_batch = max_batch
        self.slots = slots
        self.threads = threads
        self._cond = threading.Condition()
        # guarded by _cond
        self._handles: dict[int, StreamHandle] = {}  # every stream not yet done, failed or cancelled
        self._news: dict[int, StreamHandle] = {}  # streams with audio, an end or a cancel to take in
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._stopping = False
        self._busy = False  # a stream has a chunk ready (set by the model thread)
        self._thread: threading.Thread | None = None
        # the model thread's own
        self._active: dict[int, StreamHandle] = {}
        self._pools: list[CachePool] = []
        self._ids = itertools.count()

    # -- any thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the model thread (once; later calls do nothing)."""
        import torch

        with self._cond:
            self._check_open()
            if self._thread is not None:
                return
            threads = self.threads or torch.get_num_threads()
            self._thread = threading.Thread(target=self._run, args=(threads,), name=THREAD_NAME, daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread after the step or call running now; pending streams and calls fail
        with a RuntimeError."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if thread is None or not thread.is_alive():
            self._fail_pending()

    @property
    def alive(self) -> bool:
        """The model thread runs and takes work."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def open_sessions(self) -> int:
        """Streams opened and not yet resolved, failed or cancelled."""
        with self._cond:
            return len(self._handles)

    @property
    def cache_slots(self) -> tuple[int, int]:
        """(slots in use, slots allocated) over the cache pools; exact when read in :meth:`call`."""
        pools = list(self._pools)
        return sum(p.in_use for p in pools), sum(p.slots for p in pools)

    def open(
        self, *, lang: str = AUTO, att_context: Sequence[int] | None = None, on_update: OnUpdate | None = None
    ) -> StreamHandle:
        """A new stream; a bad ``lang`` or ``att_context`` raises ValueError here, at once.

        ``on_update(partial, update)`` runs on the model thread after each of the stream's chunks
        with the transcript so far: keep it cheap (hand it to your own loop), never block in it.
        """
        engine = self.engine
        if not hasattr(engine.model.encoder, "cache_aware_stream_step"):
            raise ValueError(f"{engine.info.name} has no cache-aware streaming encoder")
        att = engine.resolve_att_context(att_context)
        engine.prompt_indices([lang])  # raises ValueError naming the model's languages
        with self._cond:
            self._check_open()
            handle = StreamHandle(self, next(self._ids), lang=lang, att_context=att, on_update=on_update)
            self._handles[handle.key] = handle
            self._notify(handle)
        return handle

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn()`` on the model thread between steps; the future holds its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            self._check_open()
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def _check_open(self) -> None:
        if self._stopping:
            raise RuntimeError("the stream scheduler is closed")

    def _notify(self, handle: StreamHandle) -> None:
        """With _cond held: the model thread has news of ``handle``."""
        self._news[handle.key] = handle
        self._cond.notify()

    # -- the model thread ----------------------------------------------------------------

    def _run(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        log.info("model thread started (%d torch threads, %s)", threads, "batched" if self.batched else "unbatched")
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._news or self._calls or self._busy):
                        self._cond.wait()
                    if self._stopping:
                        return
                    news = self._take_news()
                    call = self._calls.popleft() if self._calls else None
                self._take_in(news)
                self._step_round()
                self._resolve_ended()
                if call is not None:
                    _run_call(*call)
        except BaseException:
            log.exception("the model thread stopped")
            raise
        finally:
            with self._cond:
                self._stopping = True
            self._fail_pending()

    def _take_news(self) -> list[tuple[StreamHandle, State, list[np.ndarray]]]:
        news = [(h, h._state, h._audio) for h in self._news.values()]
        for h in self._news.values():
            h._audio = []
        self._news.clear()
        return news

    def _take_in(self, news: list[tuple[StreamHandle, State, list[np.ndarray]]]) -> None:
        for handle, state, audio in news:
            try:
                if state == "cancelled":
                    self._drop(handle)
                    continue
                session = handle._session
                if session is None:
                    session = StreamingSession(
                        self.engine, lang=handle.lang, att_context=handle.att_context, pool=self._pool(handle)
                    )
                    handle._session = session
                    self._active[handle.key] = handle
                if audio:
                    session.feed(np.concatenate(audio), run=False)
                if state == "finishing":
                    session.close_input()
            except Exception as exc:
                log.exception("stream %s could not take its audio", handle.key)
                self._fail(handle, exc)

    def _pool(self, handle: StreamHandle) -> CachePool:
        for pool in self._pools:
            if pool.serves(handle.att_context):
                return pool
        pool = CachePool(self.engine, self.slots, att_context=handle.att_context)
        self._pools.append(pool)
        return pool

    def _step_round(self) -> None:
        """One chunk for every stream that has one ready."""
        sessions = [h._session for h in self._active.values() if h._session is not None]
        if self.batched:
            groups = ready_groups(sessions, self.max_batch)
        else:
            groups = [[s] for s in sessions if s.ready()]
        by_session = {id(h._session): h for h in self._active.values()}
        for group in groups:
            handles = [by_session[id(s)] for s in group]
            try:
                step_sessions(group)
            except Exception as exc:
                log.exception("a step of %d stream(s) failed", len(group))
                for handle in handles:
                    self._fail(handle, exc)
                continue
            for handle, session in zip(handles, group, strict=True):
                update = session.update()
                handle._decoded_s = update.decoded_s
                if handle._on_update is not None:
                    try:
                        handle._on_update(session.transcript(), update)
                    except Exception as exc:
                        log.exception("on_update of stream %s failed", handle.key)
                        self._fail(handle, exc)
        busy = any(h._session is not None and h._session.ready() for h in self._active.values())
        with self._cond:
            self._busy = busy

    def _resolve_ended(self) -> None:
        for handle in list(self._active.values()):
            session = handle._session
            if session is None or not session.input_closed or session.ready():
                continue
            try:
                transcript = session.finish()  # nothing left to step: this only releases the slot
            except Exception as exc:
                self._fail(handle, exc)
                continue
            del self._active[handle.key]
            if self._settle(handle, "done"):
                _set(handle._future, transcript)

    def _drop(self, handle: StreamHandle) -> None:
        """Forget a stream on the model thread and free its slot."""
        self._active.pop(handle.key, None)
        if handle._session is not None:
            handle._session.close()

    def _fail(self, handle: StreamHandle, exc: BaseException) -> None:
        self._drop(handle)
        if self._settle(handle, "done"):
            _set(handle._future, exc=exc)

    def _settle(self, handle: StreamHandle, state: State) -> bool:
        """Move a stream out of the open ones; False if a cancel got there first."""
        with self._cond:
            if handle._state == "cancelled":
                return False
            handle._state = state
            self._handles.pop(handle.key, None)
            self._news.pop(handle.key, None)
            return True

    def _fail_pending(self) -> None:
        error = RuntimeError("the stream scheduler was closed before this work was done")
        with self._cond:
            handles = list(self._handles.values())
            calls = list(self._calls)
            self._calls.clear()
            self._news.clear()
            for handle in handles:
                handle._state = "done"
            self._handles.clear()
        for handle in handles:
            _set(handle._future, exc=error)
        for _, future in calls:
            _set(future, exc=error)


def _run_call(fn: Callable[[], Any], future: concurrent.futures.Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return  # cancelled by its holder while queued
    try:
        result = fn()
    except BaseException as exc:
        future.set_exception(exc)
        if not isinstance(exc, Exception):
            raise
    else:
        future.set_result(result)


def _set(future: concurrent.futures.Future[Any], result: Any = None, *, exc: BaseException | None = None) -> None:
    """Resolve a future nobody else resolves; one its holder cancelled stays cancelled."""
    if not future.set_running_or_notify_cancel():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)

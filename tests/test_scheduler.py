"""Many streams on one model thread: pooled caches, batched steps, offline work in between."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import asr.scheduler
from asr.engine import TranscribeOptions
from asr.scheduler import StreamScheduler
from asr.streaming import CachePool, step_ready

RESULT_S = 120  # the longest a test waits for a future


def clip_in(short_clips, lang):
    return next(audio for row, audio in short_clips if row["lang"] == lang)


def offline(engine, audio, *, lang="auto", att=None):
    (result,) = engine.transcribe([audio], langs=[lang], options=TranscribeOptions(att_context=att))
    return result


def feed_interleaved(handles, audios, piece=1000):
    """Append every stream's audio in small pieces, round-robin, as live clients would."""
    for pos in range(0, max(len(a) for a in audios), piece):
        for handle, audio in zip(handles, audios, strict=True):
            if pos < len(audio):
                handle.append(audio[pos : pos + piece])


@pytest.fixture
def scheduler(engine):
    scheduler = StreamScheduler(engine, slots=4)
    scheduler.start()
    yield scheduler
    scheduler.close()


# -- the cache pool -----------------------------------------------------------------------


def test_the_pool_hands_out_the_lowest_free_slot_reset_to_the_initial_state(engine):
    pool = CachePool(engine, 2, grow=False)
    assert pool.modes == engine.info.att_context_sizes, "left 56 in every mode: one pool serves them all"
    assert [pool.acquire(), pool.acquire()] == [0, 1]
    with pytest.raises(RuntimeError, match="all 2 cache slots are in use"):
        pool.acquire()
    for cache in pool.caches:
        cache.fill_(7)
    pool.release(0)
    with pytest.raises(ValueError, match="released twice"):
        pool.release(0)
    assert pool.acquire() == 0
    first, second = (pool.gather([s]) for s in (0, 1))
    assert all(torch.count_nonzero(c) == 0 for c in first), "an acquired slot starts from the initial state"
    assert all(bool((c == 7).all()) for c in second), "other slots are untouched"
    assert pool.in_use == 2


def test_a_full_pool_doubles_and_keeps_its_streams(engine):
    pool = CachePool(engine, 2)
    for _ in range(2):
        pool.acquire()
    for k, cache in enumerate(pool.caches):
        cache.fill_(k + 1)
    assert pool.acquire() == 2 and pool.slots == 4
    kept = pool.gather([0, 1])
    assert all(bool((c == k + 1).all()) for k, c in enumerate(kept))


def test_gather_and_scatter_keep_the_order_of_the_slots_given(engine):
    pool = CachePool(engine, 6, grow=False)
    slots = [pool.acquire() for _ in range(6)]
    rows = [torch.randint_like(c, 1, 1000) for c in pool.gather(slots)]
    pool.scatter(slots, rows)
    picked = [4, 1, 3]  # not a range: index_select / index_copy_
    got = pool.gather(picked)
    for dim_row, c in zip(rows, got, strict=True):
        dim = 1 if c.dim() > 1 else 0
        assert torch.equal(c, dim_row.index_select(dim, torch.tensor(picked)))
    pool.scatter(picked, [torch.zeros_like(c) for c in got])
    run = pool.gather([2, 3, 4])  # a range: a view
    assert run[0].data_ptr() == pool.caches[0][:, 2].data_ptr()
    assert torch.count_nonzero(pool.gather([1])[0]) == 0 and torch.count_nonzero(run[0][:, 0]) > 0


@pytest.mark.slow
def test_pooled_sessions_give_the_offline_text(engine, short_clips):
    audios = [audio for _, audio in short_clips[::24]]
    for att in [(56, 0), (56, 13)]:
        expected = engine.transcribe(audios, options=TranscribeOptions(att_context=att))
        pool = CachePool(engine, 3)
        sessions = [engine.stream(att_context=att, pool=pool) for _ in audios]
        for pos in range(0, max(len(a) for a in audios), 1500):
            for s, audio in zip(sessions, audios, strict=True):
                if pos < len(audio):
                    s.feed(audio[pos : pos + 1500], run=False)
            while step_ready(sessions):
                pass
        got = [s.finish() for s in sessions]
        assert [g.text_raw for g in got] == [e.text_raw for e in expected]
        assert pool.in_use == 0, "finished sessions give their slots back"


def test_a_closed_session_frees_its_slot_and_takes_no_more_audio(engine, short_clips):
    pool = CachePool(engine, 1, grow=False)
    session = engine.stream(pool=pool)
    session.feed(short_clips[0][1][:8000])
    session.close()
    assert pool.in_use == 0
    with pytest.raises(RuntimeError, match="finished or closed"):
        session.feed(short_clips[0][1][:100])


# -- the scheduler ------------------------------------------------------------------------


def test_three_concurrent_streams_in_two_languages_and_two_modes_each_equal_offline(engine, short_clips, scheduler):
    spanish, german, french = (clip_in(short_clips, lang) for lang in ("es-ES", "de-DE", "fr-FR"))
    specs = [(spanish, "auto", None), (german, "de-DE", None), (french, "auto", (56, 3))]
    expected = [offline(engine, audio, lang=lang, att=att).text_raw for audio, lang, att in specs]
    updates: list[list[str]] = [[], [], []]
    threads: set[int] = set()

    def on_update(i):
        def record(partial, update):
            updates[i].append(partial.text)
            threads.add(threading.get_ident())

        return record

    handles = [
        scheduler.open(lang=lang, att_context=att, on_update=on_update(i)) for i, (_, lang, att) in enumerate(specs)
    ]
    feed_interleaved(handles, [audio for audio, _, _ in specs], piece=700)
    finals = [h.finish().result(timeout=RESULT_S) for h in handles]
    assert [f.text_raw for f in finals] == expected
    assert [f.lang_requested for f in finals] == ["auto", "de-DE", "auto"]
    assert finals[2].att_context == (56, 3) and finals[0].att_context == engine.info.default_att_context
    assert all(u for u in updates), "every stream got partial updates"
    model_thread = scheduler.call(threading.get_ident).result(timeout=RESULT_S)
    assert threads == {model_thread}, "updates come from the model thread, where calls run too"
    assert scheduler.open_sessions == 0
    assert scheduler.call(lambda: scheduler.cache_slots).result(timeout=RESULT_S) == (0, 4)


@pytest.mark.slow
def test_batched_and_unbatched_steps_give_the_same_text(engine, short_clips):
    audios = [audio for _, audio in short_clips[1::10]]
    texts = {}
    for batched in (True, False):
        scheduler = StreamScheduler(engine, batched=batched, max_batch=3)
        scheduler.start()
        try:
            handles = [scheduler.open(att_context=(56, 1)) for _ in audios]
            feed_interleaved(handles, audios)
            texts[batched] = [h.finish().result(timeout=RESULT_S).text_raw for h in handles]
        finally:
            scheduler.close()
    assert texts[True] == texts[False]
    assert texts[True] == [
        t.text_raw for t in engine.transcribe(audios, options=TranscribeOptions(att_context=(56, 1)))
    ]


def test_a_cancelled_stream_gives_its_slot_to_the_next(engine, short_clips):
    scheduler = StreamScheduler(engine, slots=1)
    scheduler.start()
    try:
        audio = short_clips[3][1]
        first = scheduler.open()
        first.append(audio[:16000])
        assert scheduler.call(lambda: scheduler.cache_slots).result(timeout=RESULT_S) == (1, 1)
        first.cancel()
        assert first.finish().cancelled() and scheduler.open_sessions == 0
        with pytest.raises(RuntimeError, match="cancelled"):
            first.append(audio[:100])
        assert scheduler.call(lambda: scheduler.cache_slots).result(timeout=RESULT_S) == (0, 1)
        second = scheduler.open()
        second.append(audio)
        assert second.finish().result(timeout=RESULT_S).text_raw == offline(engine, audio).text_raw
        assert scheduler.call(lambda: scheduler.cache_slots).result(timeout=RESULT_S) == (0, 1), "no growth"
    finally:
        scheduler.close()


def test_bad_languages_modes_and_samples_are_refused_at_once(scheduler):
    with pytest.raises(ValueError, match="use 'auto' or one of"):
        scheduler.open(lang="tlh-KL")
    with pytest.raises(ValueError, match="is not a mode of"):
        scheduler.open(att_context=(56, 2))
    handle = scheduler.open()
    with pytest.raises(ValueError, match="NaN or inf"):
        handle.append(np.array([0.0, np.inf], np.float32))
    handle.cancel()


def test_a_failing_step_fails_its_streams_only(engine, short_clips, scheduler, monkeypatch):
    real_step = asr.scheduler.step_sessions

    def step(sessions):
        if any(s.lang == "fr-FR" for s in sessions):
            raise RuntimeError("boom")
        real_step(sessions)

    monkeypatch.setattr(asr.scheduler, "step_sessions", step)
    audio = clip_in(short_clips, "fr-FR")
    doomed = scheduler.open(lang="fr-FR")
    fine = scheduler.open(lang="auto", att_context=(56, 6))  # another mode: never in the same step
    feed_interleaved([doomed, fine], [audio, audio])
    with pytest.raises(RuntimeError, match="boom"):
        doomed.finish().result(timeout=RESULT_S)
    assert fine.finish().result(timeout=RESULT_S).text_raw == offline(engine, audio, att=(56, 6)).text_raw
    monkeypatch.setattr(asr.scheduler, "step_sessions", real_step)
    later = scheduler.open(lang="fr-FR")
    later.append(audio)
    assert later.finish().result(timeout=RESULT_S).text_raw == offline(engine, audio, lang="fr-FR").text_raw
    assert scheduler.alive and scheduler.call(lambda: scheduler.cache_slots[0]).result(timeout=RESULT_S) == 0


def test_a_failing_update_callback_fails_that_stream_only(engine, short_clips, scheduler):
    audio = short_clips[5][1]

    def explode(partial, update):
        raise ValueError("callback bug")

    bad, good = scheduler.open(on_update=explode), scheduler.open(on_update=lambda p, u: None)
    feed_interleaved([bad, good], [audio, audio])
    with pytest.raises(ValueError, match="callback bug"):
        bad.finish().result(timeout=RESULT_S)
    assert good.finish().result(timeout=RESULT_S).text_raw == offline(engine, audio).text_raw


def test_offline_calls_run_between_steps_and_their_errors_stay_in_their_future(engine, short_clips, scheduler):
    audio = short_clips[7][1]
    stream = scheduler.open()
    stream.append(audio)
    (result,) = scheduler.call(lambda: engine.transcribe([audio])).result(timeout=RESULT_S)
    with pytest.raises(ZeroDivisionError):
        scheduler.call(lambda: 1 / 0).result(timeout=RESULT_S)
    assert stream.finish().result(timeout=RESULT_S).text_raw == result.text_raw
    assert stream.pending_s() < 0.2, "all appended audio was decoded"


def test_an_idle_scheduler_sleeps(scheduler):
    scheduler.call(lambda: None).result(timeout=RESULT_S)
    time.sleep(0.3)  # OpenMP's workers may spin a little after the last torch work of a test before
    before = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - before < 0.1, "no busy waiting"


def test_close_fails_what_is_pending(engine, short_clips):
    scheduler = StreamScheduler(engine)
    scheduler.start()
    release = threading.Event()
    blocking = scheduler.call(release.wait)
    while not blocking.running():
        time.sleep(0.01)
    queued = scheduler.call(lambda: "never")
    stream = scheduler.open()
    stream.append(short_clips[0][1])
    ending = stream.finish()
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    while scheduler.alive:
        time.sleep(0.01)
    release.set()
    closer.join(timeout=RESULT_S)
    assert blocking.result() is True, "the call running when close came finishes"
    for future in (queued, ending):
        with pytest.raises(RuntimeError, match="closed before this work was done"):
            future.result(timeout=1)
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.open()
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.call(lambda: None)


def test_close_before_start_fails_what_was_queued(engine):
    scheduler = StreamScheduler(engine)
    stream, call = scheduler.open(), scheduler.call(lambda: None)
    ending = stream.finish()
    scheduler.close()
    for future in (call, ending):
        with pytest.raises(RuntimeError, match="closed"):
            future.result(timeout=1)

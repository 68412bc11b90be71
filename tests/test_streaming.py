"""Cache-aware streaming sessions: equal to offline, incremental, safe across languages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asr.engine import TranscribeOptions
from asr.streaming import transcribe_streaming

pytestmark = pytest.mark.slow

MODES = [(56, 13), (56, 6), (56, 3), (56, 1), (56, 0)]


@pytest.mark.parametrize("att", MODES, ids=lambda a: f"{a[0]}-{a[1]}")
def test_streaming_final_text_equals_offline_on_every_corpus_clip(engine, short_clips, att):
    rows, audios = zip(*short_clips, strict=True)
    langs = ["auto" if i % 4 else row["lang"] for i, row in enumerate(rows)]
    offline = engine.transcribe(list(audios), langs=langs, options=TranscribeOptions(att_context=att))
    streamed = transcribe_streaming(engine, list(audios), langs=langs, att_context=att, feed_samples=2000)
    mismatches = [(o.text_raw, s.text_raw) for o, s in zip(offline, streamed, strict=True) if o.text_raw != s.text_raw]
    assert not mismatches, f"{len(mismatches)}/{len(rows)} differ, e.g. {mismatches[:3]}"
    # word timing and confidence survive the chunking
    for o, s in zip(offline, streamed, strict=True):
        assert [w.start_s for w in s.words] == [w.start_s for w in o.words]
        assert [w.confidence for w in s.words] == pytest.approx([w.confidence for w in o.words], abs=0.02)


def test_one_session_gives_partials_then_the_offline_text(engine, short_clips):
    row, audio = max(short_clips, key=lambda ra: len(ra[1]))
    (offline,) = engine.transcribe([audio], options=TranscribeOptions(att_context=(56, 3)))
    session = engine.stream(att_context=(56, 3))
    rng = np.random.default_rng(1)
    pos, partials, decoded = 0, [], []
    while pos < len(audio):
        n = int(rng.integers(1, 6000))  # any chunk size, even a single sample
        update = session.feed(audio[pos : pos + n])
        partials.append(update.text)
        decoded.append(update.decoded_s)
        pos += n
    final = session.finish()
    assert final.text_raw == offline.text_raw
    assert decoded == sorted(decoded) and decoded[-1] > 0
    assert any(p and p != final.text for p in partials), "partial text appears before the end"
    with pytest.raises(RuntimeError, match="finished"):
        session.feed(audio[:100])


def test_sessions_in_different_languages_share_a_batch_without_crosstalk(engine, short_clips):
    _, audio = next((r, a) for r, a in short_clips if r["lang"] == "fr-FR")
    langs = ["en-US", "de-DE", "auto", "es-ES"]
    offline = engine.transcribe([audio] * 4, langs=langs, options=TranscribeOptions(att_context=(56, 6)))
    streamed = transcribe_streaming(engine, [audio] * 4, langs=langs, att_context=(56, 6))
    assert [s.text_raw for s in streamed] == [o.text_raw for o in offline]
    assert [s.lang_requested for s in streamed] == ["en-US", "de-DE", "auto", "es-ES"]


def test_features_are_computed_incrementally_and_exactly(engine, short_clips):
    audio = np.concatenate([a for _, a in short_clips[:10]])
    session = engine.stream(att_context=(56, 13))
    held = []
    for pos in range(0, len(audio), 1600):
        session.feed(audio[pos : pos + 1600], run=False)
        held.append(len(session._audio))
    session.close_input()
    with torch.inference_mode():
        feats, n = engine.model.preprocessor(
            input_signal=torch.from_numpy(audio)[None], length=torch.tensor([len(audio)])
        )
    assert torch.equal(session._features, feats[0, :, : int(n[0])])
    # the raw audio kept for feature context never grows with the stream
    assert max(held) <= 1600 + 2 * 160 + 512


def test_bad_chunks_are_refused(engine):
    session = engine.stream()
    with pytest.raises(ValueError, match="NaN or inf"):
        session.feed(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="use 'auto' or one of"):
        engine.stream(lang="tlh-KL")


def test_sessions_with_and_without_a_cache_pool_never_share_a_step(engine, short_clips):
    from asr.streaming import CachePool, ready_groups, step_sessions

    audio = short_clips[0][1]
    pooled, own = engine.stream(pool=CachePool(engine, 1)), engine.stream()
    for session in (pooled, own):
        session.feed(audio, run=False)
    assert pooled.batch_key() != own.batch_key()
    assert sorted(len(g) for g in ready_groups([pooled, own])) == [1, 1]
    with pytest.raises(ValueError, match="share one cache pool"):
        step_sessions([pooled, own])
    assert pooled.finish().text_raw == own.finish().text_raw
    assert pooled.slot is None and pooled.pool.in_use == 0

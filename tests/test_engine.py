"""The offline engine on the bundled demo model and the sample corpus."""

from __future__ import annotations

import numpy as np
import pytest

from asr.engine import TranscribeOptions
from records.text import TAG_RE, word_errors
from records.text import normalize as normalize_for_wer
from tests.quality import needs_accurate_model

pytestmark = pytest.mark.slow

MODES = [(56, 13), (56, 6), (56, 3), (56, 1), (56, 0)]


def wer(pairs) -> float:
    errors = words = 0
    for ref, hyp in pairs:
        e, n = word_errors(normalize_for_wer(ref), normalize_for_wer(hyp))
        errors, words = errors + e, words + n
    return errors / max(words, 1)


def test_the_model_describes_itself_from_its_checkpoint(engine):
    info = engine.info
    assert info.uses_prompts
    assert {"en-US", "es-ES", "de-DE", "fr-FR"} <= set(info.locales)
    # the real Nemotron 3.5 indices, read from the model, not hard-coded in the engine
    assert info.prompt_dictionary["auto"] == 101
    assert info.prompt_dictionary["en-US"] == 0 and info.prompt_dictionary["de-DE"] == 9
    assert set(info.att_context_sizes) == set(MODES)
    assert info.frame_shift_s == pytest.approx(0.08)
    assert info.model_id.startswith("earmark-demo@") and len(info.sha256) == 64


def test_each_row_of_a_batch_is_conditioned_on_its_own_prompt(engine, short_clips):
    import torch

    _, audio = short_clips[0]
    x = torch.from_numpy(audio)[None].repeat(3, 1)
    lengths = torch.full((3,), len(audio))
    prompts = torch.tensor([engine.info.prompt_index(lang) for lang in ("en-US", "de-DE", "auto")])
    with torch.inference_mode():
        together, _ = engine.model.forward(input_signal=x, input_signal_length=lengths, prompt_indices=prompts)
        for row in range(3):
            alone, _ = engine.model.forward(
                input_signal=x[row : row + 1], input_signal_length=lengths[:1], prompt_indices=prompts[row : row + 1]
            )
            assert torch.allclose(together[row], alone[0], atol=1e-4)
    # the same audio under three prompts gives three different encoder outputs
    assert not torch.allclose(together[0], together[1], atol=1e-3)
    assert not torch.allclose(together[1], together[2], atol=1e-3)
    # and whole transcripts: each row of a mixed batch is exactly what it would be alone
    mixed = engine.transcribe([audio] * 3, langs=["en-US", "de-DE", "auto"])
    for lang, result in zip(["en-US", "de-DE", "auto"], mixed, strict=True):
        (alone_t,) = engine.transcribe([audio], langs=[lang])
        assert result.text_raw == alone_t.text_raw and result.lang_requested == lang


def test_a_forced_locale_is_obeyed_and_auto_hears_the_language(engine, short_clips):
    row, audio = next((r, a) for r, a in short_clips if r["lang"] == "es-ES" and len(r["langs"]) == 1)
    forced_en, forced_de, auto = engine.transcribe([audio, audio, audio], langs=["en-US", "de-DE", "auto"])
    assert {s.lang for s in forced_en.sentences} == {"en-US"}
    assert {s.lang for s in forced_de.sentences} == {"de-DE"}
    assert auto.lang_detected == "es-ES"


def test_short_aliases_and_case_map_to_the_same_prompt(engine, short_clips):
    _, audio = short_clips[0]
    a, b, c = engine.transcribe([audio] * 3, langs=["de-DE", "de", "DE-de"])
    assert a.text_raw == b.text_raw == c.text_raw
    assert b.lang_requested == "de-DE"


def test_transcripts_hold_words_sentences_and_languages(engine, short_clips):
    rows, audios = zip(*short_clips, strict=True)
    results = engine.transcribe(list(audios))
    assert len(results) == len(rows)
    for row, res in zip(rows, results, strict=True):
        assert not TAG_RE.search(res.text), "tags never reach the readable text"
        tags_written = TAG_RE.findall(res.text_raw)
        assert all(s.lang in tags_written for s in res.sentences if s.lang)
        assert " ".join(s.text for s in res.sentences) == res.text
        assert 0.0 <= res.confidence <= 1.0
        assert res.duration_s == pytest.approx(row["duration"], abs=0.01)
        starts = [w.start_s for w in res.words]
        assert starts == sorted(starts)
        for w in res.words:
            assert 0.0 <= w.start_s < w.end_s <= res.duration_s + 0.2
            assert 0.0 <= w.confidence <= 1.0
            assert not TAG_RE.search(w.word)
        assert " ".join(w.word for w in res.words) == res.text


@needs_accurate_model
def test_the_corpus_is_transcribed_accurately_with_a_language_per_sentence(engine, short_clips):
    rows, audios = zip(*short_clips, strict=True)
    results = engine.transcribe(list(audios))
    switched = [(r, res) for r, res in zip(rows, results, strict=True) if len(set(r["langs"])) > 1]
    assert len(switched) >= 8
    right = sum([s.lang for s in res.sentences] == r["langs"] for r, res in switched)
    assert right / len(switched) >= 0.8
    # and the words are right
    assert wer((r["text"], res.text) for r, res in zip(rows, results, strict=True)) <= 0.15


@pytest.mark.parametrize("att", MODES, ids=lambda a: f"{a[0]}-{a[1]}")
def test_every_latency_mode_is_selectable(engine, short_clips, att):
    rows, audios = zip(*short_clips[::4], strict=True)
    results = engine.transcribe(list(audios), options=TranscribeOptions(att_context=att))
    assert all(r.att_context == att for r in results)
    assert tuple(engine.model.encoder.att_context_size) == att


@pytest.mark.parametrize("att", MODES, ids=lambda a: f"{a[0]}-{a[1]}")
def test_every_latency_mode_transcribes_the_corpus(engine, short_clips, att):
    rows, audios = zip(*short_clips, strict=True)
    results = engine.transcribe(list(audios), options=TranscribeOptions(att_context=att))
    assert wer((r["text"], res.text) for r, res in zip(rows, results, strict=True)) <= 0.25


def test_batch_packing_does_not_change_results(engine, short_clips):
    audios = [a for _, a in short_clips[:12]]
    one_by_one = engine.transcribe(audios, options=TranscribeOptions(max_batch_size=1))
    packed = engine.transcribe(audios, options=TranscribeOptions(batch_seconds=10_000, max_batch_size=64))
    assert [r.text_raw for r in one_by_one] == [r.text_raw for r in packed]
    assert [r.confidence for r in one_by_one] == pytest.approx([r.confidence for r in packed], abs=1e-3)


def test_confidence_is_lower_where_the_model_is_wrong(engine, short_clips):
    rows, audios = zip(*short_clips, strict=True)
    noisy = [a + np.random.default_rng(i).normal(0, 0.08, len(a)).astype(np.float32) for i, a in enumerate(audios)]
    results = engine.transcribe(list(audios) + noisy)
    refs = list(rows) + list(rows)
    wrong = [
        res.confidence
        for r, res in zip(refs, results, strict=True)
        if word_errors(normalize_for_wer(r["text"]), normalize_for_wer(res.text))[0]
    ]
    right = [
        res.confidence
        for r, res in zip(refs, results, strict=True)
        if not word_errors(normalize_for_wer(r["text"]), normalize_for_wer(res.text))[0]
    ]
    assert wrong and right
    assert np.mean(wrong) < np.mean(right)


def test_bad_requests_name_the_choices(engine, short_clips):
    _, audio = short_clips[0]
    with pytest.raises(ValueError, match="use 'auto' or one of .*de-DE"):
        engine.transcribe([audio], langs=["xx-YY"])
    with pytest.raises(ValueError, match="not a mode .* use one of 56,13"):
        engine.transcribe([audio], options=TranscribeOptions(att_context=(70, 13)))
    with pytest.raises(ValueError, match="one language per clip"):
        engine.transcribe([audio, audio], langs=["auto"])


def test_very_short_and_silent_audio_give_empty_text(engine):
    silent, blip = np.zeros(16000, np.float32), np.zeros(200, np.float32)
    a, b = engine.transcribe([silent, blip])
    assert a.text == "" and b.text == "" and a.words == () and a.lang_detected is None
    assert 0.0 <= a.confidence <= 1.0

"""The contracts package: records round-trip through rows, tables, Parquet and manifest lines;
the docs hold the schema's own table."""

from __future__ import annotations

import datetime as dt
import doctest
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import records.clips
import records.manifest
import records.text
from records.clips import ClipRef, clip_id
from records.manifest import (
    ManifestEntry,
    ManifestError,
    count_entries,
    manifest_base,
    parse_line,
    read_manifest,
    resolve_audio_path,
    to_line,
    write_manifest,
)
from records.pseudo_labels import (
    SCHEMA,
    PseudoLabel,
    Segment,
    Sentence,
    Word,
    conform,
    from_table,
    markdown_table,
    to_table,
)
from records.text import char_errors, normalize, split_tagged, strip_tags, tag_text, word_errors

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", [records.clips, records.manifest, records.text])
def test_the_examples_in_the_docstrings_hold(module) -> None:
    failed, tried = doctest.testmod(module)
    assert tried > 0 and failed == 0


def test_the_docs_hold_the_schemas_own_table() -> None:
    docs = (ROOT / "docs" / "pseudo-labels.md").read_text()
    assert markdown_table() in docs, "docs/pseudo-labels.md is stale: paste `python -m records.pseudo_labels` into it"
    assert f"schema version {SCHEMA.metadata[b'earmark.schema_version'].decode()}" in docs


def _label(segment: Segment) -> PseudoLabel:
    class Transcript:  # what the engine returns, as far as a pseudo-label needs it
        text = "Hola amigo."
        text_raw = "Hola amigo. <es-ES>"
        lang_requested = "es-ES"
        lang_detected = "es-ES"
        sentences = (Sentence("Hola amigo.", "es-ES", 0.2, 1.1, 0.8, lang_confidence=0.99),)
        words = (Word("Hola", 0.2, 0.6, 0.9), Word("amigo.", 0.6, 1.1, 0.7))
        confidence = 0.8

    created = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.UTC)
    return PseudoLabel.of(
        segment, Transcript(), model_id="demo@x", att_context=(56, 13), run_id="r1", created_at=created
    )


def test_a_pseudo_label_round_trips_through_rows_tables_and_parquet(tmp_path: Path) -> None:
    whole = Segment(
        clip_id("/a.flac", 0.0, None),
        clip_id("/a.flac", 0.0, None),
        "/a.flac",
        None,
        0.0,
        None,
        0,
        1,
        "auto",
        "ref",
        None,
    )
    ok = _label(whole.with_source_hash("abc").with_duration(1.25))
    failed = PseudoLabel.of(
        whole.with_error("truncated"),
        None,
        model_id="demo@x",
        att_context=(56, 13),
        run_id="r1",
        created_at=ok.created_at,
    )
    silent = PseudoLabel.of(whole, None, model_id="demo@x", att_context=(56, 13), run_id="r1", created_at=ok.created_at)
    assert (failed.status, failed.text, failed.error) == ("error", None, "truncated")
    assert (silent.status, silent.text, silent.words) == ("ok", "", ())

    pq.write_table(to_table([ok, failed, silent]), tmp_path / "part.parquet")
    back = from_table(pq.read_table(tmp_path / "part.parquet"))

    # the tag's own confidence is the engine's, not the table's: everything else comes back as it was
    assert back[0] == _without_tag_confidence(ok)
    assert back[1:] == [failed, silent]
    assert PseudoLabel.from_row(ok.to_row()) == _without_tag_confidence(ok)


def _without_tag_confidence(label: PseudoLabel) -> PseudoLabel:
    from dataclasses import replace

    return replace(label, sentences=tuple(replace(s, lang_confidence=None) for s in label.sentences))


def test_a_table_with_bookkeeping_columns_conforms_to_the_schema() -> None:
    table = to_table([_label(Segment("c", "c", "/a.flac", None, 0.0, 1.0, 0, 1, "auto", None, None))])
    wider = table.append_column("shard", pa.array([3], pa.int64()))
    assert conform(wider).schema == SCHEMA and conform(wider).num_rows == 1


def test_a_segment_of_a_long_recording_is_a_clip_of_its_own() -> None:
    item = Segment("i", "i", "/talk.flac", "h", 10.0, None, 0, 1, "auto", None, None)
    part = item.with_span(30.2504, 12.3333, 1, 3)
    assert (part.offset_s, part.duration_s, part.segment_index, part.segment_count) == (40.25, 12.333, 1, 3)
    assert part.clip_id == clip_id("/talk.flac", 40.25, 12.333) and part.item_id == "i"
    assert ClipRef("/talk.flac", 40.25, 12.333).clip_id == part.clip_id


def test_a_manifest_entry_round_trips_and_keeps_keys_it_does_not_know() -> None:
    line = '{"audio_filepath": "a/1.flac", "duration": 2.5, "offset": 1, "text": "Hi. <en-US>", "target_lang": "en-US", "speaker": "s7"}'
    entry = parse_line(line, base="/data/set")
    assert entry.audio_filepath == "/data/set/a/1.flac" and entry.offset == 1.0 and entry.extra == {"speaker": "s7"}
    assert parse_line(to_line(entry)) == entry
    assert json.loads(to_line(ManifestEntry("/a.wav"))) == {"audio_filepath": "/a.wav"}  # nothing made up
    assert read_manifest(write_manifest([entry, entry])) == [entry, entry]


def test_relative_audio_paths_resolve_against_the_manifests_folder_as_nemo_does(tmp_path: Path) -> None:
    assert resolve_audio_path("a/1.flac", "s3://bucket/sets") == "s3://bucket/sets/a/1.flac"
    assert resolve_audio_path("s3://other/x.wav", "/data") == "s3://other/x.wav"
    assert resolve_audio_path("/abs/x.wav", "s3://bucket") == "/abs/x.wav"
    assert manifest_base(str(tmp_path / "m.jsonl")) == str(tmp_path)
    assert manifest_base("s3://bucket/sets/m.jsonl") == "s3://bucket/sets"


def test_a_bad_manifest_line_is_one_error_naming_the_file_and_line() -> None:
    with pytest.raises(ManifestError, match=r"m.jsonl:2: not a NeMo manifest line"):
        read_manifest('{"audio_filepath": "a.wav"}\n{"text": "no audio"}\n', name="m.jsonl")
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(b"\xff\xfe{", name="m.jsonl")
    entry = parse_line('{"audio_filepath": "a.wav", "lang": "auto"}')
    assert entry.locale is None and entry.requested_lang == "auto"


def test_counting_a_manifest_reads_durations_without_parsing_it() -> None:
    lines = b'{"audio_filepath": "a", "duration": 1.5}\n\n{"duration":2, "audio_filepath": "b"}\n{"audio_filepath": "c", "duration": 3e0}'
    assert count_entries([lines[:17], lines[17:]]) == (3, 6.5)
    assert count_entries([b'{"audio_filepath": "a"}\n']) == (1, None)


def test_one_normaliser_and_one_error_count_for_every_wer() -> None:
    assert normalize("¿Qué TAL? <es-ES>  c'est-à-dire!") == "qué tal c'est-à-dire"
    assert word_errors("Hola amigo.", "hola amigo") == (0, 2)
    assert word_errors("Hola amigo.", "hola amigo", normalized=False) == (2, 2)
    assert word_errors("", "uno dos") == (2, 0) and word_errors("uno dos", "") == (2, 2)
    assert char_errors("abc", "abd") == (1, 3)
    assert [s.lang for s in split_tagged("Uno. <es-ES> Two <en-US> tail")] == ["es-ES", "en-US", None]
    assert strip_tags(tag_text("Hola. Que tal?", "es-ES")) == "Hola. Que tal?"
    assert tag_text("Hola. <es-ES>", "de-DE") == "Hola. <es-ES>"  # tagged text is kept as it is

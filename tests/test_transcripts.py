"""The transcript renderer: parts of a recording put back together with absolute times, subtitles
people can read, OpenAI's verbose_json; and ``earmark transcripts`` over a real batch job's output."""

from __future__ import annotations

import datetime as dt
import doctest
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import srt
import webvtt
from typer.testing import CliRunner

import records.transcripts
from demo.corpus import CORPUS_DIR
from jobs.cli import app
from records.clips import clip_id
from records.pseudo_labels import PseudoLabel, Segment, Sentence, Word, to_table
from records.transcripts import (
    FORMATS,
    MAX_CUE_S,
    MAX_LINE_CHARS,
    RecordingTranscript,
    file_names,
    recordings_from_labels,
    render,
    subtitle_cues,
    to_srt,
    to_text,
    to_verbose_json,
    to_vtt,
)

ROOT = Path(__file__).resolve().parents[1]
EARMARK = [sys.executable, "-m", "jobs.cli"]
CREATED = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Part:
    """What the engine returns for one part of a recording, as far as a transcript needs it."""

    text: str
    text_raw: str
    lang_requested: str
    lang_detected: str | None
    sentences: tuple[Sentence, ...]
    words: tuple[Word, ...]
    confidence: float
    duration_s: float | None


def part(*sentences: tuple[str, str | None, float, float], duration_s: float | None = 30.0) -> Part:
    """A part saying ``sentences`` (text, locale, start, end: seconds from the part's start), its
    words spread evenly over each sentence, as the engine builds sentences from words."""
    words: list[Word] = []
    built: list[Sentence] = []
    for text, lang, start, end in sentences:
        tokens = text.split()
        step = (end - start) / len(tokens)
        words += [
            Word(w, round(start + k * step, 3), round(start + (k + 1) * step, 3), 0.8) for k, w in enumerate(tokens)
        ]
        built.append(Sentence(text, lang, start, end, 0.8))
    text = " ".join(s[0] for s in sentences)
    raw = " ".join(f"{s[0]} <{s[1]}>" for s in sentences)
    return Part(text, raw, "auto", built[0].lang if built else None, tuple(built), tuple(words), 0.8, duration_s)


def labels(item: Segment, parts: list[tuple[float, float, Part | str]]) -> list[PseudoLabel]:
    """The rows of ``item`` cut into segments (start, duration, its transcript or why it failed)."""
    out = []
    for k, (start, duration, result) in enumerate(parts):
        segment = item.with_span(start, duration, k, len(parts))
        out.append(
            PseudoLabel.of(
                segment.with_error(result) if isinstance(result, str) else segment,
                result if isinstance(result, Part) else None,
                model_id="demo@x",
                att_context=(56, 13),
                run_id="r1",
                created_at=CREATED,
            )
        )
    return out


def item(source: str = "/talks/talk.flac", offset_s: float = 0.0, duration_s: float | None = None) -> Segment:
    cid = clip_id(source, offset_s, duration_s)
    return Segment(cid, cid, source, "h", offset_s, duration_s, 0, 1, "auto", None, None)


def test_the_example_in_the_docstring_holds() -> None:
    failed, tried = doctest.testmod(records.transcripts)
    assert tried > 0 and failed == 0


def test_parts_come_back_together_with_every_time_shifted_by_its_offset() -> None:
    first = part(("Hello there.", "en-US", 1.0, 2.0), ("Wie geht es dir?", "de-DE", 3.0, 5.0), duration_s=28.5)
    second = part(("Good.", "en-US", 0.5, 1.25), duration_s=10.0)
    t = RecordingTranscript.from_parts("/a.flac", [(28.5, second), (0.0, first)], model_id="demo@x")

    assert t.text == "Hello there. Wie geht es dir? Good."
    assert [(s.start_s, s.end_s) for s in t.sentences] == [(1.0, 2.0), (3.0, 5.0), (29.0, 29.75)]
    assert [w.start_s for w in t.words][-1] == 29.0 and t.words[-1].end_s == 29.75
    assert t.sentence_seek_s == (0.0, 0.0, 28.5)
    assert (t.offset_s, t.duration_s, t.end_s, t.parts) == (0.0, 38.5, 38.5, 2)
    assert t.language == "de-DE"  # four German words, three English
    assert t.confidence == 0.8 and t.model_id == "demo@x" and t.errors == ()


def test_a_time_past_a_parts_end_is_clipped_to_it() -> None:
    late = Part("Bye.", "Bye. <en-US>", "auto", "en-US", (Sentence("Bye.", "en-US", 9.5, 10.08, 0.9),),
                (Word("Bye.", 9.5, 10.08, 0.9),), 0.9, 10.0)  # fmt: skip
    t = RecordingTranscript.from_parts("/a.flac", [(0.0, late), (10.0, late)])
    assert [(s.start_s, s.end_s) for s in t.sentences] == [(9.5, 10.0), (19.5, 20.0)]


def test_rows_of_one_item_become_one_recording_and_clips_of_one_file_stay_apart() -> None:
    talk = labels(
        item(), [(0.0, 28.0, part(("One two.", "en-US", 1.0, 2.0))), (28.0, 20.0, part(("Three.", "en-US", 1.0, 1.5)))]
    )
    clip = labels(item(offset_s=60.0, duration_s=10.0), [(0.0, 10.0, part(("Later.", "en-US", 2.0, 3.0)))])
    recordings = recordings_from_labels(reversed(talk + clip))  # any order

    assert [(t.offset_s, t.text) for t in recordings] == [(0.0, "One two. Three."), (60.0, "Later.")]
    whole, later = recordings
    assert whole.item_id == talk[0].item_id and whole.duration_s == 48.0
    assert [s.start_s for s in whole.sentences] == [1.0, 29.0]
    assert later.sentences[0].start_s == 62.0  # on the file's timeline


def test_a_failed_segment_is_left_out_and_said_and_a_recording_with_none_left_has_no_parts() -> None:
    rows = labels(item(), [(0.0, 28.0, part(("Kept.", "en-US", 1.0, 2.0))), (28.0, 20.0, "model ran out of memory")])
    broken = labels(item("/talks/broken.wav"), [(0.0, 5.0, "truncated file")])
    kept, none = recordings_from_labels(rows + broken[:1])[::-1]

    assert kept.text == "Kept." and kept.parts == 1 and kept.duration_s == 48.0
    assert kept.errors == ("segment 2 of 2 at 28.000 s: model ran out of memory",)
    assert none.parts == 0 and none.text == "" and none.errors == ("truncated file",)
    assert to_srt(none) == "" and to_vtt(none) == "WEBVTT\n" and to_text(none) == ""


def test_a_segment_missing_from_the_table_is_said_and_one_seen_twice_is_refused() -> None:
    rows = labels(item(), [(0.0, 10.0, part(("A.", "en-US", 1.0, 2.0))), (10.0, 10.0, part(("B.", "en-US", 1.0, 2.0)))])
    (t,) = recordings_from_labels(rows[:1])
    assert t.errors == ("segment 2 of 2: not in the table",)
    with pytest.raises(ValueError, match="a table holds each segment once"):
        recordings_from_labels(rows + rows[:1])


def long_sentence() -> RecordingTranscript:
    """A 30-word sentence over 14 s, and a short one after it whose first word the model emitted
    in the same frame as the last word before (their times overlap)."""
    words = " ".join(f"word{k:02d}" for k in range(30)) + "."
    p = part((words, "en-US", 2.0, 16.0), ("Then this.", "en-US", 15.9, 17.0))
    return RecordingTranscript.from_parts("/long.flac", [(100.0, p)])


def test_a_long_sentence_is_cut_at_words_into_cues_people_can_read() -> None:
    t = long_sentence()
    cues = subtitle_cues(t)

    assert len(cues) >= 3  # 30 words: more than two lines of 42 characters, and 14 s
    assert all((c.end_ms - c.start_ms) / 1000 <= MAX_CUE_S for c in cues)
    assert all(1 <= len(c.lines) <= 2 and max(map(len, c.lines)) <= MAX_LINE_CHARS for c in cues)
    assert " ".join(c.text for c in cues) == t.text
    assert cues[-1].text == "Then this." and cues[0].start_ms == 102_000  # absolute: offset 100 s
    lengths = [len(c.text) for c in cues[:-1]]
    assert max(lengths) - min(lengths) <= 12  # cut evenly, not a long cue and a stub


def test_cues_never_overlap_and_start_strictly_in_order() -> None:
    cues = subtitle_cues(long_sentence())
    assert all(c.start_ms < c.end_ms for c in cues)
    assert all(a.end_ms <= b.start_ms for a, b in pairwise(cues))


def test_srt_and_vtt_read_back_with_their_parsers_at_the_same_times(tmp_path: Path) -> None:
    t = long_sentence()
    cues = subtitle_cues(t)
    document = to_srt(t)
    assert document.splitlines()[1] == "00:01:42,000 --> " + document.splitlines()[1].split(" --> ")[1]
    subs = list(srt.parse(document))
    assert [(s.start.total_seconds(), s.end.total_seconds()) for s in subs] == [
        (c.start_ms / 1000, c.end_ms / 1000) for c in cues
    ]
    assert [s.content.split("\n") for s in subs] == [list(c.lines) for c in cues]

    (tmp_path / "t.vtt").write_text(to_vtt(t))
    captions = webvtt.read(str(tmp_path / "t.vtt"))
    assert to_vtt(t).startswith("WEBVTT\n\n00:01:42.000 --> ")
    assert [(_seconds(c.start), _seconds(c.end)) for c in captions] == [
        (c.start_ms / 1000, c.end_ms / 1000) for c in cues
    ]
    assert " ".join(c.text.replace("\n", " ") for c in captions) == t.text


def test_vtt_escapes_what_would_read_as_markup() -> None:
    t = RecordingTranscript.from_parts("/a.flac", [(0.0, part(("Fish & chips <3", "en-GB", 0.0, 2.0)))])
    assert "Fish &amp; chips &lt;3" in to_vtt(t) and "Fish & chips <3" in to_srt(t)


def test_verbose_json_has_openais_shape_with_earmarks_extras() -> None:
    p = part(("Hallo zusammen.", "de-DE", 0.5, 1.5), ("Bis bald.", "de-DE", 2.0, 3.0), duration_s=29.0)
    t = RecordingTranscript.from_parts("/a.flac", [(0.0, p), (29.0, p)], model_id="demo@x")
    doc = to_verbose_json(t)

    assert list(doc) == ["task", "language", "locale", "duration", "text", "segments", "words", "usage", "model"]
    assert (doc["task"], doc["language"], doc["locale"], doc["duration"]) == ("transcribe", "german", "de-DE", 58.0)
    assert doc["usage"] == {"type": "duration", "seconds": 58.0} and doc["model"] == "demo@x"
    first, *_, last = doc["segments"]
    assert list(first) == [
        "id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
        "no_speech_prob", "locale", "confidence",
    ]  # fmt: skip
    assert (first["id"], first["seek"], first["start"], first["end"], first["text"]) == (
        0,
        0,
        0.5,
        1.5,
        "Hallo zusammen.",
    )
    assert (last["id"], last["seek"], last["start"]) == (3, 2900, 31.0)
    assert (first["tokens"], first["temperature"], first["avg_logprob"], first["no_speech_prob"]) == (
        [],
        0.0,
        None,
        None,
    )
    assert 0 < first["compression_ratio"] < 1  # a short text grows under zlib
    assert (first["locale"], first["confidence"]) == ("de-DE", 0.8)
    assert doc["words"][0] == {"word": "Hallo", "start": 0.5, "end": 1.0, "confidence": 0.8}
    assert json.loads(render(t, "verbose_json")) == doc == json.loads(render(t, "json"))


def test_a_language_openai_has_no_name_for_is_given_as_its_code() -> None:
    t = RecordingTranscript.from_parts("/a.flac", [(0.0, part(("Kia ora.", "mi-NZ", 0.0, 1.0)))])
    assert (to_verbose_json(t)["language"], to_verbose_json(t)["locale"]) == ("mi", "mi-NZ")


def test_render_knows_every_format_and_names_them_for_an_unknown_one() -> None:
    t = long_sentence()
    assert render(t, "text") == render(t, "txt") == t.text + "\n"
    assert render(t, "srt") == to_srt(t) and render(t, "vtt") == to_vtt(t)
    with pytest.raises(ValueError, match="unknown transcript format 'docx'; the formats: text, txt, srt, vtt, json"):
        render(t, "docx")
    assert set(FORMATS.values()) == {"txt", "srt", "vtt", "json"}


def test_file_names_keep_the_sources_name_and_tell_clashes_apart_the_same_way_every_time() -> None:
    one = RecordingTranscript.from_parts("/a/talk.flac", [], item_id="1111aaaa2222")
    clip = RecordingTranscript.from_parts("/a/talk.flac", [], offset_s=60.0, item_id="3333bbbb4444")
    other = RecordingTranscript.from_parts("s3://b/other/talk.wav", [], item_id="5555cccc6666")
    solo = RecordingTranscript.from_parts("s3://b/x/interview.mp3", [], item_id="7777")
    assert file_names([one, clip, other, solo], "srt") == [
        "talk-1111aaaa.srt",
        "talk-3333bbbb.srt",
        "talk-5555cccc.srt",
        "interview.srt",
    ]
    assert file_names([solo], "text") == ["interview.txt"]


def test_transcripts_of_a_missing_or_empty_folder_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        result = runner.invoke(app, ["transcripts", str(folder), "--to", str(tmp_path / "srt")])
        assert result.exit_code == 3, result.output
        assert "no pseudo-labels" in result.output and "earmark transcribe" in result.output
    assert not (tmp_path / "srt").exists()
    bad = runner.invoke(app, ["transcripts", str(tmp_path), "--to", str(tmp_path), "--format", "docx"])
    assert bad.exit_code == 2


def test_transcripts_writes_a_file_per_recording_of_a_table(tmp_path: Path) -> None:
    rows = labels(item("/talks/a.flac"), [(0.0, 20.0, part(("One.", "en-US", 1.0, 2.0))), (20.0, 9.0, "bad")])
    rows += labels(item("/talks/b.flac"), [(0.0, 5.0, part(("Two.", "en-US", 1.0, 2.0)))])
    rows += labels(item("/talks/c.flac"), [(0.0, 5.0, "truncated")])
    out = tmp_path / "labels"
    out.mkdir()
    pq.write_table(to_table(rows), out / "part-000000.parquet")

    result = CliRunner().invoke(app, ["transcripts", str(out), "--format", "txt", "--to", str(tmp_path / "txt")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "txt").iterdir()) == ["a.txt", "b.txt"]
    assert (tmp_path / "txt" / "a.txt").read_text() == "One.\n"
    assert f"wrote 2 .txt files to {tmp_path / 'txt'}; 1 recordings skipped" in result.output
    assert "1 written with failed segments left out" in result.output and "skipped /talks/c.flac" in result.output


# --- end to end: a real batch job on the demo corpus's long recordings -----------------------------


def earmark(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    quiet = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "NEMO_LOGGING_LEVEL": "ERROR"}
    return subprocess.run(
        [*EARMARK, *args], capture_output=True, text=True, cwd=ROOT, env=os.environ | quiet | (env or {}), timeout=900
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """``earmark transcribe`` over the long recordings (70 to 90 s each) and a truncated file."""
    audio = tmp_path_factory.mktemp("audio")
    for f in sorted((CORPUS_DIR / "long").glob("*.flac")):
        shutil.copy(f, audio / f.name)
    shutil.copy(CORPUS_DIR / "broken" / "truncated.wav", audio / "truncated.wav")
    out = tmp_path_factory.mktemp("labels") / "run"
    done = earmark("transcribe", str(audio), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    return out, pq.read_table(out).to_pylist()


def segments_of(rows: list[dict], name: str) -> list[dict]:
    return sorted((r for r in rows if Path(r["source_uri"]).name == name), key=lambda r: r["segment_index"])


@pytest.mark.slow
def test_a_jobs_long_recordings_become_subtitles_that_parsers_read_in_step(job, tmp_path: Path) -> None:
    out, rows = job
    written = {}
    for fmt in ("srt", "vtt", "json"):
        made = earmark("transcripts", str(out), "--format", fmt, "--to", str(tmp_path / fmt))
        assert made.returncode == 0, made.stderr
        assert made.stdout.strip() == (
            f"wrote 3 .{fmt} files to {tmp_path / fmt}; 1 recordings skipped (every segment failed); "
            "0 written with failed segments left out"
        )
        assert "skipped" in made.stderr and "truncated.wav" in made.stderr
        written[fmt] = sorted(p.name for p in (tmp_path / fmt).iterdir())
    assert written["srt"] == ["de-DE-talk.srt", "en-US-talk.srt", "mixed-talk.srt"]

    for flac in sorted((CORPUS_DIR / "long").glob("*.flac")):
        segments = segments_of(rows, flac.name)
        assert len(segments) >= 3 and all(s["status"] == "ok" for s in segments)
        text = " ".join(s["text"] for s in segments if s["text"])
        start, end = segments[0]["offset_s"], segments[-1]["offset_s"] + segments[-1]["duration_s"]
        first_segment_end = segments[0]["offset_s"] + segments[0]["duration_s"]

        subs = list(srt.parse((tmp_path / "srt" / f"{flac.stem}.srt").read_text()))
        times = [(s.start.total_seconds(), s.end.total_seconds()) for s in subs]
        captions = webvtt.read(str(tmp_path / "vtt" / f"{flac.stem}.vtt"))
        vtt_times = [(_seconds(c.start), _seconds(c.end)) for c in captions]
        assert vtt_times == times
        for cues in (times, vtt_times):
            assert start <= cues[0][0] and cues[-1][1] <= end  # within the recording
            assert all(a < b for a, b in cues) and all(b <= c for (_, b), (c, _) in pairwise(cues))
            assert cues[-1][1] > first_segment_end  # the later segments' offsets were applied
        assert " ".join(s.content.replace("\n", " ") for s in subs) == text
        assert " ".join(c.text.replace("\n", " ") for c in captions) == text

        doc = json.loads((tmp_path / "json" / f"{flac.stem}.json").read_text())
        assert doc["text"] == text and doc["duration"] == pytest.approx(end - start, abs=1e-3)
        assert sorted({s["seek"] for s in doc["segments"]}) == [
            round(s["offset_s"] * 100) for s in segments if s["text"]
        ]
        assert doc["language"] in {"english", "german", "spanish", "french"}


def _seconds(clock: str) -> float:
    h, m, s = clock.split(":")
    return round(int(h) * 3600 + int(m) * 60 + float(s), 3)


@pytest.mark.slow
def test_transcripts_read_a_jobs_output_from_s3_and_write_there(job, s3_server, s3_bucket: str) -> None:
    from cluster.storage import list_files, read_bytes, upload_file

    out, rows = job
    options = s3_server.options()
    for p in sorted(out.rglob("*")):
        if p.is_file():
            upload_file(p, f"s3://{s3_bucket}/labels/{p.relative_to(out)}", options)
    keys = {"EARMARK_S3_ACCESS_KEY_ID": s3_server.access_key, "EARMARK_S3_SECRET_ACCESS_KEY": s3_server.secret_key}
    made = earmark(
        "transcripts", f"s3://{s3_bucket}/labels", "--format", "vtt", "--to", f"s3://{s3_bucket}/vtt",
        "--endpoint-url", s3_server.endpoint_url, env=keys,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert sorted(list_files(f"s3://{s3_bucket}/vtt", options)) == [
        f"s3://{s3_bucket}/vtt/{name}-talk.vtt" for name in ("de-DE", "en-US", "mixed")
    ]
    document = read_bytes(f"s3://{s3_bucket}/vtt/en-US-talk.vtt", options).decode()
    captions = webvtt.from_string(document)
    text = " ".join(s["text"] for s in segments_of(rows, "en-US-talk.flac") if s["text"])
    assert " ".join(c.text.replace("\n", " ") for c in captions) == text

    missing = earmark(
        "transcripts", f"s3://{s3_bucket}/nothing", "--to", f"s3://{s3_bucket}/srt",
        "--endpoint-url", s3_server.endpoint_url, env=keys,
    )  # fmt: skip
    assert missing.returncode == 3 and "no pseudo-labels" in missing.stderr

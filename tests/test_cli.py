"""The earmark command, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cluster.storage import upload_file
from demo import MODEL_PATH as DEMO_MODEL_PATH

EARMARK = [sys.executable, "-m", "jobs.cli"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*EARMARK, *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300
    )


def test_help_loads_neither_torch_nor_nemo_nor_ray():
    code = "import sys, jobs.cli; bad = [m for m in ('torch', 'nemo', 'ray') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    helped = run("--help")
    assert helped.returncode == 0 and "transcribe-file" in helped.stdout


def test_every_command_help_renders():
    """Typer renders help text as rich markup: a bracket such as ``NAME[/VERSION]`` in a help string
    would crash that command's --help."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from jobs.cli import app

    def paths(command: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
        found = [prefix]
        for name, sub in getattr(command, "commands", {}).items():
            found += paths(sub, (*prefix, name))
        return found

    runner = CliRunner()
    every = paths(get_command(app))
    assert len(every) > 15
    for path in every:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, f"earmark {' '.join(path)} --help: {result.output}{result.exception!r}"


@pytest.mark.slow
def test_transcribe_file_prints_sentences_with_language_and_confidence(engine, corpus):
    from asr.audio import decode_audio
    from asr.engine import TranscribeOptions

    row = next(r for r in corpus if "sentences" not in r and len(r["langs"]) == 2)
    audio = decode_audio(row["audio_filepath"])
    (expected,) = engine.transcribe([audio])
    out = run("transcribe-file", row["audio_filepath"])
    assert out.returncode == 0, out.stderr
    assert "language:" in out.stdout and expected.model_id in out.stdout.replace("\n", "")
    for sentence in expected.sentences:
        assert (sentence.lang or "-") in out.stdout
        assert sentence.text.split()[0] in out.stdout
    as_json = run("transcribe-file", row["audio_filepath"], "--json", "--lang", "de-DE", "--att-context", "56,3")
    doc = json.loads(as_json.stdout)
    (forced,) = engine.transcribe([audio], langs=["de-DE"], options=TranscribeOptions(att_context=(56, 3)))
    assert doc["lang_requested"] == "de-DE" and doc["att_context"] == [56, 3]
    assert doc["text_raw"] == forced.text_raw and doc["source"] == row["audio_filepath"]
    assert {"text", "sentences", "words", "confidence", "model_id", "lang_detected"} <= set(doc)


def test_bad_input_gets_one_clear_error_and_its_exit_code(corpus):
    broken = Path(corpus[0]["audio_filepath"]).parents[1] / "broken" / "truncated.wav"
    out = run("transcribe-file", str(broken))
    assert out.returncode == 3 and "truncated" in out.stderr and "Traceback" not in out.stderr
    missing = run("transcribe-file", "/nonexistent/clip.wav")
    assert missing.returncode == 3 and "does not exist" in missing.stderr
    bad_att = run("transcribe-file", corpus[0]["audio_filepath"], "--att-context", "56")
    assert bad_att.returncode == 2 and "LEFT,RIGHT" in bad_att.stderr


@pytest.mark.slow
def test_unknown_language_lists_the_model_locales(corpus):
    out = run("transcribe-file", corpus[0]["audio_filepath"], "--lang", "xx-YY")
    assert out.returncode == 2 and "de-DE" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_model_and_audio_straight_from_s3(s3_server, s3_bucket, corpus, tmp_path):
    upload_file(DEMO_MODEL_PATH, f"s3://{s3_bucket}/m/model.nemo", s3_server.options())
    upload_file(corpus[0]["audio_filepath"], f"s3://{s3_bucket}/audio/clip.flac", s3_server.options())
    env = {
        "EARMARK_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "EARMARK_S3_ACCESS_KEY_ID": s3_server.access_key,
        "EARMARK_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
        "EARMARK_CACHE_DIR": str(tmp_path),
    }
    out = run(
        "transcribe-file",
        f"s3://{s3_bucket}/audio/clip.flac",
        "--model",
        f"s3://{s3_bucket}/m/model.nemo",
        "--json",
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model_id"].startswith("model@")


def test_demo_loop_refuses_an_accent_espeak_cannot_speak_before_it_starts(tmp_path):
    voice = run("demo", "loop", "--out", str(tmp_path / "a"), "--voice", "xx-nowhere")
    # espeak-ng lacks the voice: an input problem (3); a malformed option: bad usage (2)
    assert voice.returncode == 3 and "no voice 'xx-nowhere'" in voice.stderr and "Traceback" not in voice.stderr
    variant = run("demo", "loop", "--out", str(tmp_path / "b"), "--variants", "m6,nobody")
    assert variant.returncode == 3 and "no voice variant 'nobody'" in variant.stderr
    speed = run("demo", "loop", "--out", str(tmp_path / "c"), "--speed", "190,135")
    assert speed.returncode == 2 and "MAX" in speed.stderr and "Traceback" not in speed.stderr
    assert not any((tmp_path / name / "data").exists() for name in "abc")

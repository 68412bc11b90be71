"""``earmark transcribe`` end to end on a real local Ray, the bundled model and corpus, real S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from cluster.storage import StorageOptions, pyarrow_filesystem, upload_file
from demo.corpus import CORPUS_DIR
from jobs.stages import JobSettings
from jobs.transcribe import JobError, TranscribeRequest, run_transcribe
from records.text import normalize as normalize_for_wer
from records.text import word_errors
from tests.raycluster import LocalCluster
from tests.s3server import S3Server

pytestmark = pytest.mark.slow
EARMARK = [sys.executable, "-m", "jobs.cli"]
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "NEMO_LOGGING_LEVEL": "ERROR"}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from cluster.runtime import connect

    connect(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of the corpus (short clips, long recordings), its broken files, a line that is
    not JSON and a file that does not exist."""
    folder = tmp_path_factory.mktemp("archive")
    lines = (CORPUS_DIR / "manifest.jsonl").read_text().splitlines()
    lines += [
        json.dumps({"audio_filepath": str(CORPUS_DIR / json.loads(b)["audio_filepath"])})
        for b in (CORPUS_DIR / "broken.jsonl").read_text().splitlines()
    ]
    lines += ["this is not json", json.dumps({"audio_filepath": "missing/nowhere.wav"})]
    # corpus paths are relative to the corpus folder: make them absolute for this manifest
    fixed = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            fixed.append(line)
            continue
        if not row["audio_filepath"].startswith("/") and not row["audio_filepath"].startswith("missing"):
            row["audio_filepath"] = str(CORPUS_DIR / row["audio_filepath"])
        fixed.append(json.dumps(row, ensure_ascii=False))
    (folder / "archive.jsonl").write_text("\n".join(fixed) + "\n")
    return folder / "archive.jsonl"


def _request(input: str, out: str, *, storage: StorageOptions | None = None, **kw) -> TranscribeRequest:
    settings = JobSettings(run_id="", storage=storage or StorageOptions())
    return TranscribeRequest(input=input, out=out, settings=settings, quiet=True, lines_per_shard=16, **kw)


@pytest.fixture(scope="module")
def job(ray_local, archive: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("labels") / "run"
    summary = run_transcribe(_request(str(archive), str(out)))
    return out, summary, pq.read_table(out).to_pylist()


def test_every_input_clip_comes_back_exactly_once(job, archive: Path) -> None:
    out, summary, rows = job
    items = {r["item_id"] for r in rows}
    lines = [line for line in archive.read_text().splitlines() if line.strip()]
    assert len(items) == len(lines) == summary.items
    assert len({r["clip_id"] for r in rows}) == len(rows) == summary.rows
    assert (out / "_SUCCESS").exists()


def test_short_clips_match_the_engine_clip_for_clip(job, engine, short_clips) -> None:
    _, _, rows = job
    from asr.audio import decode_audio

    by_source = {r["source_uri"]: r for r in rows if r["segment_count"] == 1}
    # the same input the job decoded: a manifest's duration bounds the read, as in NeMo
    audios = [decode_audio(row["audio_filepath"], duration_s=row["duration"]) for row, _ in short_clips]
    expected = engine.transcribe(
        audios, langs=[row.get("lang") or "auto" for row, _ in short_clips]
    )  # as the lines ask
    for (row, _), want in zip(short_clips, expected, strict=True):
        got = by_source[row["audio_filepath"]]
        assert got["status"] == "ok"
        assert got["text"] == want.text and got["text_raw"] == want.text_raw
        assert got["lang_detected"] == want.lang_detected
        assert got["confidence"] == pytest.approx(want.confidence, abs=1e-4)
        assert [w["word"] for w in got["words"]] == [w.word for w in want.words]
        assert [s["lang"] for s in got["sentences"]] == [s.lang for s in want.sentences]
        assert got["model_id"] == engine.model_id and got["ref_text"] == row["text"]


def test_bad_files_become_error_rows_with_their_reason(job, archive: Path) -> None:
    _, summary, rows = job
    errors = {r["source_uri"]: r["error"] for r in rows if r["status"] == "error"}
    files = {Path(uri).name for uri in errors if not uri.startswith(f"{archive}#")}
    assert files == {
        "empty.wav",
        "truncated.wav",
        "not_audio.wav",
        "random.mp3",
        "nan.wav",
        "zero_frames.wav",
        "nowhere.wav",
    }
    (bad_line,) = [e for uri, e in errors.items() if uri.startswith(f"{archive}#")]
    assert "not a NeMo manifest line" in bad_line and "this is not json" in bad_line
    assert "no such file" in next(e for uri, e in errors.items() if uri.endswith("nowhere.wav"))
    assert "truncated" in next(e for uri, e in errors.items() if uri.endswith("truncated.wav"))
    assert summary.clips_error == 8
    assert summary.clips_ok == len(rows) - 8 == 96 + sum(1 for r in rows if r["segment_count"] > 1)


def test_long_recordings_come_back_as_segments_cut_between_sentences(job, corpus) -> None:
    _, _, rows = job
    for ref in (r for r in corpus if "sentences" in r):
        segments = sorted((r for r in rows if r["source_uri"] == ref["audio_filepath"]), key=lambda r: r["offset_s"])
        assert len(segments) >= 3
        assert [s["segment_index"] for s in segments] == list(range(len(segments)))
        assert all(s["duration_s"] <= 30.0 and s["segment_count"] == len(segments) for s in segments)
        for sentence in ref["sentences"]:  # every sentence lies inside one segment: cuts fall in pauses
            inside = [
                s
                for s in segments
                if s["offset_s"] <= sentence["start_s"] and sentence["end_s"] <= s["offset_s"] + s["duration_s"]
            ]
            assert len(inside) == 1, sentence
        text = " ".join(s["text"] for s in segments)
        errors, words = word_errors(normalize_for_wer(ref["text"]), normalize_for_wer(text))
        assert errors / words <= 0.35, (errors / words, text)


def test_output_reads_as_is_with_duckdb_pandas_and_datasets(job) -> None:
    import duckdb
    import pandas as pd

    out, summary, _ = job
    n = duckdb.sql(f"select count(*) from '{out}/*.parquet' where status = 'ok'").fetchall()[0][0]
    assert n == summary.clips_ok
    frame = pd.read_parquet(out)
    assert len(frame) == summary.rows and "words" in frame.columns
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=f"{out}/*.parquet", split="train")
    assert ds.num_rows == summary.rows


def test_a_finished_job_does_no_model_work_when_run_again(job, archive: Path) -> None:
    out, first, _ = job
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = run_transcribe(_request(str(archive), str(out)))
    assert again.this_run.rows_transcribed == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == stamps
    assert again.rows == first.rows


def test_a_rerun_with_other_settings_is_refused(job, archive: Path) -> None:
    out, _, _ = job
    import dataclasses

    request = _request(str(archive), str(out))

    options = dataclasses.replace(request.settings.options, lang="de-DE")
    other = dataclasses.replace(request, settings=dataclasses.replace(request.settings, options=options))
    with pytest.raises(JobError, match="Rerun with the same input and options"):
        run_transcribe(other)


def _spawn(args: list[str], **kw) -> subprocess.Popen:
    env = os.environ | QUIET_ENV
    return subprocess.Popen([*EARMARK, *args], env=env, start_new_session=True, **kw)


def test_killing_the_driver_then_rerunning_gives_every_clip_exactly_once(archive: Path, tmp_path: Path, job) -> None:
    out = tmp_path / "killed"
    args = ["transcribe", str(archive), "--out", str(out), "--shard-size", "8", "--quiet"]
    proc = _spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(list(out.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no part written in time"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only, mid-run
    proc.wait()
    parts_before = len(list(out.glob("part-*.parquet")))
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # then whatever Ray processes the driver leaves behind
    except ProcessLookupError:
        pass
    assert not (out / "_SUCCESS").exists()

    rerun = _spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr.decode()[-3000:]
    assert b"execution finished" not in stderr, "Ray Data's INFO logs leak through --quiet"
    summary = json.loads(stdout)

    _, reference, ref_rows = job
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["clip_id"] for r in rows) == sorted(r["clip_id"] for r in ref_rows)
    assert summary["rows"] == summary["unique_clip_ids"] == reference.rows
    assert 0 < summary["this_run"]["rows_transcribed"] < reference.rows  # only the unfinished part was redone
    assert parts_before >= 3
    print(  # the figures for a reader (pytest -s)
        f"killed after {parts_before} parts; the rerun transcribed {summary['this_run']['rows_transcribed']} of "
        f"{reference.rows} rows; the output holds {summary['rows']} rows, {summary['unique_clip_ids']} clip ids"
    )


def test_input_and_output_on_s3(ray_local, s3_server: S3Server, s3_bucket: str, corpus) -> None:
    options = s3_server.options()
    shorts = [r for r in corpus if "sentences" not in r][:12]
    for row in shorts:
        upload_file(row["audio_filepath"], f"s3://{s3_bucket}/audio/{Path(row['audio_filepath']).name}", options)
    upload_file(CORPUS_DIR / "broken" / "truncated.wav", f"s3://{s3_bucket}/audio/zz-truncated.wav", options)

    summary = run_transcribe(_request(f"s3://{s3_bucket}/audio", f"s3://{s3_bucket}/labels/run1", storage=options))

    fs, root = pyarrow_filesystem(f"s3://{s3_bucket}/labels/run1", options)
    rows = pads.dataset(root, filesystem=fs, format="parquet").to_table().to_pylist()
    assert len(rows) == summary.rows == 13
    assert all(r["source_uri"].startswith(f"s3://{s3_bucket}/audio/") for r in rows)
    assert [r["status"] for r in rows].count("error") == 1
    assert all(r["text"] for r in rows if r["status"] == "ok")
    assert fs.get_file_info(f"{root}/_SUCCESS").size == 0


def test_the_job_runs_across_a_multi_node_ray_cluster(archive: Path, tmp_path: Path, corpus) -> None:
    """A head and a worker node on loopback; the two model actors spread, one per node."""
    manifest = tmp_path / "short.jsonl"
    manifest.write_text(
        "".join(json.dumps({"audio_filepath": r["audio_filepath"]}) + "\n" for r in corpus if "sentences" not in r)
    )
    with LocalCluster(head_cpus=2) as cluster:
        cluster.add_worker(cpus=2)
        result = subprocess.run(
            [*EARMARK, "transcribe", str(manifest), "--out", str(tmp_path / "out"), "--address", cluster.address,
             "--actors", "2", "--shard-size", "8", "--batch-size", "4", "--quiet"],
            env=cluster.env, capture_output=True, timeout=600,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    summary = json.loads(result.stdout)
    assert summary["rows"] == summary["clips_ok"] == len(manifest.read_text().splitlines())
    per_node = summary["this_run"]["clips_per_node"]
    assert len(per_node) == 2 and min(per_node.values()) > 0, per_node


def test_a_killed_model_worker_is_replaced_and_the_job_ends_with_every_clip_once(
    archive: Path, tmp_path: Path, job
) -> None:
    import psutil

    out = tmp_path / "worker-killed"
    started = time.time()
    proc = _spawn(
        ["transcribe", str(archive), "--out", str(out), "--shard-size", "8", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended or stalled before its first part"
        time.sleep(0.2)
    actors = [
        p
        for p in psutil.process_iter(["cmdline", "create_time"])
        if "_TranscribeActor" in " ".join(p.info["cmdline"] or ()) and p.info["create_time"] >= started - 1
    ]
    assert actors, "no model actor process found"
    for actor in actors:
        actor.kill()  # SIGKILL, mid-run

    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout)
    _, reference, ref_rows = job
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["clip_id"] for r in rows) == sorted(r["clip_id"] for r in ref_rows)
    assert summary["rows"] == summary["unique_clip_ids"] == reference.rows


def test_round_trip_from_pseudo_labels_through_review_to_manifests_nemo_and_lhotse_load(job, tmp_path: Path) -> None:
    """transcribe -> route -> corrections (the references, for the routed clips) -> export -> NeMo and Lhotse."""
    from lhotse import CutSet
    from nemo.collections.asr.parts.utils.manifest_utils import read_manifest
    from nemo.collections.common.data.lhotse.nemo_adapters import LazyNeMoIterator

    from labeling.export import ExportOptions, export_manifests
    from labeling.ingest import route_table
    from labeling.policy import Policy
    from labeling.queue import ReviewQueue

    out, summary, rows = job
    queue = ReviewQueue.connect(f"sqlite:///{tmp_path / 'review.db'}")
    report = route_table(queue, "corpus", str(out), Policy(confidence={"default": 0.5}, allow_code_switching=True))
    assert report.rows == summary.rows and report.tasks_created > 0
    refs = {r["clip_id"]: r["ref_text"] for r in rows}
    reviewer, _ = queue.add_reviewer("ana")
    corrected = {}
    while (task := queue.claim("corpus", reviewer.id)) is not None:
        text = refs[task.clip_id] or task.text  # segments of long recordings carry no reference
        queue.submit(task.id, reviewer.id, text=text, lang=task.lang)
        corrected[task.clip_id] = text

    export = export_manifests(queue, "corpus", tmp_path / "manifests", ExportOptions(dev_fraction=0.3))

    train = read_manifest(str(tmp_path / "manifests" / "train.jsonl"))
    dev = read_manifest(str(tmp_path / "manifests" / "dev.jsonl"))
    assert dev and all(r["origin"] == "review" for r in dev)
    exported = {r["clip_id"]: r for r in train + dev}
    from records.text import strip_tags

    for clip_id, text in corrected.items():
        assert " ".join(strip_tags(exported[clip_id]["text"]).split()) == " ".join(text.split())
        assert "<" in exported[clip_id]["text"]  # language tags, the way the model writes them
    assert not any(r["status"] == "error" and r["clip_id"] in exported for r in rows)
    loaded = {}
    for name in ("train", "dev"):
        cuts = CutSet(LazyNeMoIterator(str(tmp_path / "manifests" / f"{name}.jsonl"), lang_field="target_lang"))
        loaded |= {c.custom["clip_id"]: c for c in cuts}
    assert set(loaded) == set(exported)
    segment = next(r for r in train + dev if r["offset"] > 0)
    cut = loaded[segment["clip_id"]]
    assert cut.start == pytest.approx(segment["offset"]) and cut.duration == pytest.approx(
        segment["duration"], abs=0.01
    )
    assert cut.supervisions[0].text == segment["text"] and cut.supervisions[0].language == segment["target_lang"]
    assert export.train["review"] and export.dev["review"]


def test_evaluate_scores_a_manifest_per_language_and_writes_a_report(ray_local, corpus, tmp_path: Path) -> None:
    from jobs.evaluate import run_evaluate

    shorts = [r for r in corpus if "sentences" not in r][::4]
    manifest = tmp_path / "eval.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({k: r[k] for k in ("audio_filepath", "duration", "text", "text_tagged", "lang")}) + "\n"
            for r in shorts
        )
    )
    out = tmp_path / "report"

    metrics = run_evaluate(
        manifest=str(manifest), out=str(out), settings=JobSettings(run_id="", storage=StorageOptions()), quiet=True
    )

    assert metrics.clips_scored == len(shorts) and metrics.clips_failed == 0
    langs = metrics.languages
    assert {"all", "en-US", "es-ES", "de-DE", "fr-FR"} <= set(langs)
    overall = langs["all"]
    assert 0 <= overall.wer <= overall.wer_raw <= 1.5 and 0 <= overall.cer <= overall.wer + 1e-9
    assert overall.sentence_language_accuracy > 0.5
    auroc = metrics.confidence.auroc_error
    assert auroc is None or 0.0 <= auroc <= 1.0
    assert sum(b.words for b in metrics.confidence.reliability) > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "de-DE" in html
    assert json.loads((out / "metrics.json").read_text())["clips_scored"] == len(shorts)

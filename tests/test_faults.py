"""Riding out faults with real parts: the object store going away mid-job (SeaweedFS killed and
restarted on the same data), longer than the retry budget, and the exit statuses of `earmark`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from cluster.storage import pyarrow_filesystem, upload_file
from tests.s3server import S3Server

pytestmark = pytest.mark.slow
EARMARK = [sys.executable, "-m", "jobs.cli"]
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "NEMO_LOGGING_LEVEL": "ERROR"}
CLIPS = 48


def _s3_env(server: S3Server) -> dict[str, str]:
    return (
        os.environ
        | QUIET_ENV
        | {
            "EARMARK_S3_ENDPOINT_URL": server.endpoint_url,
            "EARMARK_S3_REGION": "us-east-1",
            "EARMARK_S3_ACCESS_KEY_ID": server.access_key,
            "EARMARK_S3_SECRET_ACCESS_KEY": server.secret_key,
            "RAY_ADDRESS": "",
        }
    )


@pytest.fixture
def s3_archive(s3_outage_server: S3Server, corpus) -> str:
    """``CLIPS`` short corpus clips under s3://archive/audio/."""
    s3_outage_server.client().create_bucket(Bucket="archive")
    shorts = [r for r in corpus if "sentences" not in r][:CLIPS]
    for row in shorts:
        name = Path(row["audio_filepath"]).name
        upload_file(row["audio_filepath"], f"s3://archive/audio/{name}", s3_outage_server.options())
    return "s3://archive/audio"


def _wait_for(server: S3Server, proc: subprocess.Popen, prefix: str) -> int:
    """Until the job has written a key under ``prefix`` (it runs, and has touched the store);
    returns how many keys there are."""
    client = server.client()
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else "the job ended"
        assert time.monotonic() < deadline, f"the job wrote nothing under {prefix} in time"
        if found := client.list_objects_v2(Bucket="archive", Prefix=prefix).get("KeyCount"):
            return int(found)
        time.sleep(0.05)


def _rows(server: S3Server, out: str) -> list[dict]:
    fs, root = pyarrow_filesystem(out, server.options())
    return pads.dataset(root, filesystem=fs, format="parquet").to_table().to_pylist()


def test_a_job_with_input_and_output_on_s3_rides_out_a_20_s_outage(s3_outage_server: S3Server, s3_archive: str) -> None:
    out = "s3://archive/labels/run1"
    args = ["transcribe", s3_archive, "--out", out, "--shard-size", "1", "--batch-size", "1", "--quiet"]
    proc = subprocess.Popen(
        [*EARMARK, *args], env=_s3_env(s3_outage_server), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    parts_before = _wait_for(s3_outage_server, proc, "labels/run1/part-")  # mid-job: parts are being written

    s3_outage_server.stop()
    down = time.monotonic()
    time.sleep(20)
    s3_outage_server.start()
    outage_s = time.monotonic() - down
    stdout, stderr = proc.communicate(timeout=600)

    assert proc.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout)
    rows = _rows(s3_outage_server, out)
    assert len(rows) == len({r["clip_id"] for r in rows}) == summary["rows"] == CLIPS
    assert all(r["status"] == "ok" for r in rows)
    assert stderr.decode().strip() == "", stderr.decode()[-3000:]  # --quiet: the summary and nothing else
    assert parts_before < CLIPS
    print(
        f"outage of {outage_s:.1f} s after {parts_before} of {CLIPS} parts survived; "
        f"driver retries {summary['this_run']['storage_retries']}"
    )


def test_an_outage_longer_than_the_budget_ends_with_one_line_and_status_4_then_a_rerun_completes(
    s3_outage_server: S3Server, s3_archive: str
) -> None:
    out = "s3://archive/labels/run2"
    args = ["transcribe", s3_archive, "--out", out, "--shard-size", "2", "--quiet"]
    env = _s3_env(s3_outage_server)
    proc = subprocess.Popen(
        [*EARMARK, "--retry-budget", "5", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for(s3_outage_server, proc, "labels/run2/_earmark/run.json")

    s3_outage_server.stop()
    down = time.monotonic()
    stdout, stderr = proc.communicate(timeout=300)
    gave_up_s = time.monotonic() - down
    s3_outage_server.start()

    lines = stderr.decode().strip().splitlines()
    assert proc.returncode == 4, stderr.decode()[-3000:]
    assert len(lines) == 1, stderr.decode()[-3000:]
    assert s3_outage_server.endpoint_url in lines[0] or "cannot reach the store" in lines[0]
    assert "s3://archive/" in lines[0] and "rerun the same command" in lines[0]
    assert stdout == b""

    rerun = subprocess.run([*EARMARK, *args], env=env, capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    rows = _rows(s3_outage_server, out)
    assert len(rows) == len({r["clip_id"] for r in rows}) == CLIPS
    print(f"gave up {gave_up_s:.1f} s into the outage with: {lines[0]}")


def test_a_cluster_that_does_not_answer_is_one_line_and_status_4(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    out = subprocess.run(
        [*EARMARK, "--retry-budget", "2", "transcribe", str(tmp_path), "--out", str(tmp_path / "out"),
         "--address", address, "--quiet"],
        env=os.environ | QUIET_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 4, out.stderr
    assert out.stderr.count("\n") == 1 and f"cannot reach the Ray cluster at {address}" in out.stderr, out.stderr
    assert "rerun the same command" in out.stderr and out.stdout == ""
    assert time.monotonic() - started < 60


# -- the review app while PostgreSQL restarts ----------------------------------------------------


def test_four_reviewers_ride_out_a_postgresql_restart_with_503s_and_no_lost_or_double_reviews(
    corpus, tmp_path: Path
) -> None:
    import collections
    import threading

    import httpx
    import pyarrow.parquet as pq
    import uvicorn
    from sqlalchemy import text

    from labeling.ingest import route_table
    from labeling.policy import Policy
    from labeling.queue import ReviewQueue
    from labeling.webapp import Settings, create_app
    from records.pseudo_labels import PseudoLabel, to_table
    from tests.pgserver import private_postgres
    from tests.reviewdata import corpus_rows

    with private_postgres() as pg:
        queue = ReviewQueue.connect(pg.url)
        labels = tmp_path / "labels.parquet"
        pq.write_table(to_table(PseudoLabel.from_row(r) for r in corpus_rows(corpus, 60)), labels)
        route_table(queue, "demo", str(labels), Policy(confidence={"default": 0.9}))
        tokens = {name: queue.add_reviewer(name)[1] for name in ("ana", "ben", "cai", "dee")}
        app = create_app(Settings(db=pg.url, project="demo"), queue)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
        serving = threading.Thread(target=server.run, daemon=True)
        serving.start()
        while not server.started:
            time.sleep(0.05)

        statuses: collections.Counter[int] = collections.Counter()
        acknowledged: list[tuple[int, str]] = []
        lock = threading.Lock()

        def send(client: httpx.Client, path: str, body: dict) -> httpx.Response:
            while True:  # a client that retries what the server could not do (503)
                response = client.post(path, json=body)
                with lock:
                    statuses[response.status_code] += 1
                if response.status_code != 503:
                    return response
                time.sleep(0.3)

        def review(name: str) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                assert send(client, "/api/login", {"token": tokens[name]}).status_code == 200
                while (claimed := send(client, "/api/tasks/next", {})).status_code == 200:
                    task = claimed.json()
                    time.sleep(0.15)  # reading, listening, typing
                    correction = f"{name} heard clip {task['clip_id']}"
                    done = send(client, f"/api/tasks/{task['id']}/submit", {"text": correction})
                    assert done.status_code == 200, done.text
                    # a retry of the same submit (say, its response was lost) changes nothing
                    assert send(client, f"/api/tasks/{task['id']}/submit", {"text": correction}).status_code == 200
                    with lock:
                        acknowledged.append((task["id"], correction))
                assert claimed.status_code == 204, claimed.text

        reviewers = [threading.Thread(target=review, args=(name,)) for name in tokens]
        for thread in reviewers:
            thread.start()
        while len(acknowledged) < 8:
            time.sleep(0.02)
        pg.stop()  # a restart: every open connection is cut, then nothing answers for 5 s
        time.sleep(5)
        pg.start()
        for thread in reviewers:
            thread.join(timeout=120)
        server.should_exit = True
        serving.join(timeout=10)

        with queue.engine.connect() as db:
            submits = db.execute(
                text("SELECT task_id, reviewer_id, text_after FROM reviews WHERE action = 'submit'")
            ).all()
            states = collections.Counter(s for (s,) in db.execute(text("SELECT state FROM tasks")))
        queue.engine.dispose()

    assert not any(t.is_alive() for t in reviewers)
    assert set(statuses) <= {200, 204, 503}, statuses  # never a 500
    assert statuses[503] > 0, "the outage was not felt"
    assert states == {"done": 60}
    per_task = collections.Counter(task_id for task_id, _, _ in submits)
    assert len(per_task) == 60 and set(per_task.values()) == {1}  # none lost, none twice
    assert sorted((t, text_after) for t, _, text_after in submits) == sorted(acknowledged)
    print(f"PostgreSQL restarted under 4 reviewers: {dict(statuses)}; 60 tasks, 60 reviews, 0 lost, 0 double")


# -- a lost node ------------------------------------------------------------------------------


def test_a_worker_node_lost_mid_job_leaves_the_head_to_finish_with_every_clip_once(corpus, tmp_path: Path) -> None:
    """A head and a worker node on loopback, one model actor on each; once parts are being
    written, the worker node's raylet and all its processes are killed."""
    import pyarrow.parquet as pq

    from tests.raycluster import LocalCluster

    shorts = [r for r in corpus if "sentences" not in r]
    manifest = tmp_path / "short.jsonl"
    manifest.write_text("".join(json.dumps({"audio_filepath": r["audio_filepath"]}) + "\n" for r in shorts))
    out = tmp_path / "out"
    with LocalCluster(head_cpus=2) as cluster:
        worker = cluster.add_worker(cpus=2)
        proc = subprocess.Popen(
            [*EARMARK, "transcribe", str(manifest), "--out", str(out), "--address", cluster.address,
             "--actors", "2", "--shard-size", "2", "--batch-size", "2", "--quiet"],
            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not list(out.glob("part-*.parquet")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else "the job ended"
            assert time.monotonic() < deadline, "no part written in time"
            time.sleep(0.1)
        parts_before = len(list(out.glob("part-*.parquet")))
        killed = cluster.kill_node(worker)
        stdout, stderr = proc.communicate(timeout=600)

    assert any("_TranscribeActor" in cmd for cmd in killed), killed  # a model actor went down with the node

    assert proc.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len({r["clip_id"] for r in rows}) == summary["rows"] == len(shorts)
    assert all(r["status"] == "ok" for r in rows)
    print(
        f"worker node lost after {parts_before} of {-(-len(shorts) // 2)} parts; clips per node {summary['this_run']['clips_per_node']}"
    )


def test_a_training_node_lost_mid_run_resumes_from_the_last_checkpoint_on_its_replacement(tmp_path: Path) -> None:
    """The head (1 CPU) runs the driver; the training worker (2 CPUs) lands on worker node A.
    Once a checkpoint is registered, A is lost and node B joins (what an autoscaler does): Ray
    Train restarts the worker group there, from that checkpoint."""
    from jobs.registry import Registry
    from tests.raycluster import LocalCluster
    from tests.test_finetune import _registered_checkpoints, corpus_manifests

    train, dev = corpus_manifests(tmp_path / "data")
    registry = tmp_path / "reg"
    run_dir = registry / "_train" / "lost-v0001"
    with LocalCluster(head_cpus=1) as cluster:
        node_a = cluster.add_worker(cpus=2)
        proc = subprocess.Popen(
            [*EARMARK, "finetune", "--train", str(train), "--dev", str(dev), "--registry", str(registry),
             "--name", "lost", "--address", cluster.address, "--cpus-per-worker", "2", "--max-steps", "9",
             "--steps-per-checkpoint", "3", "--lr", "1e-5", "--json"],
            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 400
        while not _registered_checkpoints(run_dir):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else "the job ended"
            assert time.monotonic() < deadline, "no checkpoint registered in time"
            time.sleep(0.2)
        killed = cluster.kill_node(node_a)
        cluster.add_worker(cpus=2)
        stdout, stderr = proc.communicate(timeout=600)

    assert any("RayTrainWorker" in cmd for cmd in killed), killed  # the training worker went down with it
    assert proc.returncode == 0, stderr.decode()[-3000:]
    training = json.loads(stdout)["training"]
    assert training["steps"] == 9 and training["attempts"] == 2, training
    assert training["resumed_from_steps"] and training["resumed_from_steps"][0] in (3, 6)
    assert Registry(str(registry)).versions("lost") == ["v0001"]
    print(f"training node lost; resumed from step {training['resumed_from_steps'][0]} on its replacement")

"""The review-queue commands, run as a user runs them (SQLite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from labeling.queue import ReviewQueue
from records.pseudo_labels import PseudoLabel, to_table
from tests.test_queue import label

ROOT = Path(__file__).resolve().parents[1]


def earmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, cwd=ROOT, env=os.environ, timeout=120
    )


def test_route_stats_review_calibrate_and_export_from_the_command_line(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'review.db'}"
    labels = tmp_path / "labels.parquet"
    pq.write_table(to_table(PseudoLabel.from_row(label(i)) for i in range(40)), labels)
    policy = tmp_path / "policy.yaml"
    policy.write_text("confidence:\n  default: 0.5\nword_confidence: 0.0\n")

    added = earmark("reviewers", "add", "ana", "--db", db)
    assert added.returncode == 0, added.stderr
    assert "cannot be shown again" in added.stderr
    assert "ana" in earmark("reviewers", "list", "--db", db).stdout
    routed = earmark("route", str(labels), "--project", "p", "--db", db, "--policy", str(policy))
    assert routed.returncode == 0, routed.stderr
    assert json.loads(routed.stdout)["decisions"] == {"accept": 20, "review": 20}
    stats = json.loads(earmark("queue", "stats", "--project", "p", "--db", db).stdout)
    assert stats["tasks"] == {"es-ES": {"open": 20}}

    queue = ReviewQueue.connect(db)
    ana = next(r for r in queue.reviewers() if r.name == "ana")
    while (task := queue.claim("p", ana.id)) is not None:
        queue.submit(task.id, ana.id, text=task.text.replace("numero", "número"), lang="es-ES")

    calibrated = earmark("calibrate", "--project", "p", "--db", db, "--out", str(tmp_path / "cal.json"))
    assert calibrated.returncode == 0, calibrated.stderr
    cal = json.loads((tmp_path / "cal.json").read_text())["languages"]["es-ES"]
    assert cal["reviewed_clips"] == 20 and 0 < cal["pseudo_label_wer"] < 1
    exported = earmark("export", "--project", "p", "--db", db, "--out", str(tmp_path / "manifests"))
    assert exported.returncode == 0, exported.stderr
    lines = [
        json.loads(x)
        for name in ("train", "dev")
        for x in (tmp_path / "manifests" / f"{name}.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 40
    assert (
        sum(1 for x in lines if x["origin"] == "review" and "número" in x["text"] and x["text"].endswith("<es-ES>"))
        == 20
    )
    assert earmark("reviewers", "revoke", "ana", "--db", db).returncode == 0


def test_bad_input_to_the_review_commands_is_one_clear_error(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'review.db'}"
    missing = earmark("route", str(tmp_path / "nope"), "--project", "p", "--db", db)
    assert missing.returncode == 3 and "error:" in missing.stderr and "Traceback" not in missing.stderr
    bad_policy = tmp_path / "p.yaml"
    bad_policy.write_text("word_conf: 0.1\n")
    refused = earmark("route", str(tmp_path / "nope"), "--project", "p", "--db", db, "--policy", str(bad_policy))
    assert refused.returncode == 3 and "unknown policy fields" in refused.stderr
    no_project = earmark("queue", "stats", "--project", "ghost", "--db", db)
    assert no_project.returncode == 3 and "no project named 'ghost'" in no_project.stderr
    # nothing listens on port 1: a database out of reach is status 4, like storage
    down = earmark("queue", "stats", "--project", "p", "--db", "postgresql+psycopg://u:p@127.0.0.1:1/x")
    assert down.returncode == 4 and "cannot reach the review database" in down.stderr, down.stderr
    assert "Traceback" not in down.stderr

"""The review queue on SQLite and on the machine's PostgreSQL: routing in, claims, corrections, audit."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from labeling.ingest import route_table
from labeling.models import Clip, Review, Task
from labeling.policy import Policy
from labeling.queue import QueueError, ReviewQueue
from records.pseudo_labels import PseudoLabel, to_table


def label(
    i: int, *, run_id: str = "run-1", text: str | None = None, conf: float | None = None, lang: str = "es-ES"
) -> dict:
    text = text if text is not None else f"Hola amigo numero {i}."
    conf = conf if conf is not None else (i % 10) / 10 + 0.05
    return {
        "clip_id": f"clip{i:05d}",
        "item_id": f"clip{i:05d}",
        "source_uri": f"/audio/{i}.flac",
        "source_hash": None,
        "offset_s": 0.0,
        "duration_s": 2.0,
        "segment_index": 0,
        "segment_count": 1,
        "status": "ok",
        "error": None,
        "text": text,
        "text_raw": f"{text} <{lang}>",
        "lang_requested": "auto",
        "lang_detected": lang,
        "sentences": [{"text": text, "lang": lang, "start_s": 0.1, "end_s": 1.9, "confidence": conf}],
        "words": [{"word": w, "start_s": 0.1, "end_s": 0.5, "confidence": conf} for w in text.split()],
        "confidence": conf,
        "ref_text": None,
        "model_id": "demo@abc",
        "att_context": [56, 13],
        "run_id": run_id,
        "created_at": dt.datetime(2026, 11, 26, tzinfo=dt.UTC),
    }


def write_labels(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(PseudoLabel.from_row(r) for r in rows), path)
    return str(path)


@pytest.fixture(params=["sqlite", "postgresql"])
def queue(request, tmp_path: Path) -> ReviewQueue:
    if request.param == "sqlite":
        yield ReviewQueue.connect(f"sqlite:///{tmp_path / 'review.db'}")
        return
    url = request.getfixturevalue("pg_url")
    q = ReviewQueue.connect(url)
    yield q
    from labeling.models import Base

    with q.engine.begin() as conn:  # each test starts from an empty schema
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


POLICY = Policy(confidence={"default": 0.5}, word_confidence=0.0)


def test_routing_sends_unsure_clips_to_review_and_is_idempotent(queue: ReviewQueue, tmp_path: Path) -> None:
    source = write_labels(tmp_path / "labels" / "part-0.parquet", [label(i) for i in range(100)])

    first = route_table(queue, "p", source, POLICY)
    assert (first.inserted, first.tasks_created) == (100, 50)
    assert first.decisions == {"accept": 50, "review": 50}
    again = route_table(queue, "p", source, POLICY)
    assert (again.inserted, again.updated, again.unchanged, again.tasks_created) == (0, 0, 100, 0)
    assert queue.stats("p") == {"project": "p", "clips": {"accept": 50, "review": 50}, "tasks": {"es-ES": {"open": 50}}}


def test_a_new_policy_changes_verdicts_not_labels(queue: ReviewQueue, tmp_path: Path) -> None:
    source = write_labels(tmp_path / "labels" / "part-0.parquet", [label(i) for i in range(100)])
    route_table(queue, "p", source, POLICY)
    stricter = Policy(confidence={"default": 0.8}, word_confidence=0.0, max_fraction=0.6)
    report = route_table(queue, "p", source, stricter)
    # 80 clips under 0.8 now, 60 of them fit the budget; the 20 most confident are over it
    assert report.decisions == {"accept": 20, "review": 60, "reject": 20}
    assert (report.inserted, report.updated, report.tasks_created) == (0, 80, 10)  # new thresholds, new reasons
    with queue.Session() as s:
        assert all(c.label_history == [] for c in s.scalars(select(Clip)))  # the labels did not change
        over = s.scalars(select(Clip).where(Clip.decision == "reject")).all()
        assert all(c.reasons[-1] == "over the review budget" for c in over)
    again = route_table(queue, "p", source, stricter)
    assert (again.updated, again.unchanged, again.tasks_created) == (0, 100, 0)


def test_a_newer_run_updates_labels_without_losing_reviews(queue: ReviewQueue, tmp_path: Path) -> None:
    route_table(queue, "p", write_labels(tmp_path / "a.parquet", [label(i) for i in range(10)]), POLICY)
    ana, _ = queue.add_reviewer("ana")
    task = queue.claim("p", ana.id)
    queue.submit(task.id, ana.id, text="Hola amiga.", lang="es-ES")

    newer = [label(i, run_id="run-2", text=f"Hola amigos {i}.", conf=0.3) for i in range(10)]
    report = route_table(queue, "p", write_labels(tmp_path / "b.parquet", newer), POLICY)

    assert report.updated == 10 and report.inserted == 0
    with queue.Session() as s:
        clip = s.scalar(select(Clip).where(Clip.clip_id == task.clip_id))
        assert clip.text == f"Hola amigos {int(task.clip_id[4:])}."
        assert clip.label_history[-1]["text_raw"].startswith("Hola amigo numero")
        done = s.scalar(select(Task).where(Task.clip_pk == clip.id))
        assert done.state == "done"  # the review stands
        assert s.scalar(select(Review.text_after).where(Review.action == "submit")) == "Hola amiga."
        assert s.scalar(select(func.count()).select_from(Task)) == 10  # every clip now needs review, once


def test_claim_submit_skip_release_and_the_audit_trail(queue: ReviewQueue, tmp_path: Path) -> None:
    route_table(
        queue, "p", write_labels(tmp_path / "a.parquet", [label(i, conf=0.1 + i / 100) for i in range(5)]), POLICY
    )
    ana, token = queue.add_reviewer("ana")
    ben, _ = queue.add_reviewer("ben")
    assert queue.authenticate(token).id == ana.id and queue.authenticate("nope") is None

    t1 = queue.claim("p", ana.id)
    assert t1.clip_id == "clip00000"  # least confident first
    assert queue.claim("p", ana.id).id == t1.id  # her current task again, not a second one
    t2 = queue.claim("p", ben.id)
    assert t2.id != t1.id
    with pytest.raises(QueueError, match="not held by reviewer"):
        queue.submit(t1.id, ben.id, text="x", lang="es-ES")
    with pytest.raises(QueueError, match="unknown flags"):
        queue.submit(t1.id, ana.id, text="x", lang="es-ES", flags=["loud"])
    queue.submit(t1.id, ana.id, text="Hola.", lang="es-ES", flags=["partial"])
    queue.skip(t2.id, ben.id)
    assert queue.claim("p", ben.id).id not in (t1.id, t2.id)  # a skipped task is not offered to him again
    t3 = queue.claim("p", ana.id)
    assert t3.id == t2.id  # but it is to others
    queue.release(t3.id, ana.id)

    with queue.Session() as s:
        actions = [a for (a,) in s.execute(select(Review.action).order_by(Review.id))]
    assert actions == ["claim", "claim", "submit", "skip", "claim", "claim", "release"]


def test_an_expired_lease_returns_the_task(queue: ReviewQueue, tmp_path: Path) -> None:
    route_table(queue, "p", write_labels(tmp_path / "a.parquet", [label(0, conf=0.1)]), POLICY)
    ana, _ = queue.add_reviewer("ana")
    ben, _ = queue.add_reviewer("ben")
    task = queue.claim("p", ana.id, lease_s=-1)  # already expired
    again = queue.claim("p", ben.id)
    assert again.id == task.id
    with pytest.raises(QueueError, match="lease expired"):
        queue.submit(task.id, ana.id, text="late", lang="es-ES")


def test_admins_reopen_and_reassign(queue: ReviewQueue, tmp_path: Path) -> None:
    route_table(queue, "p", write_labels(tmp_path / "a.parquet", [label(0, conf=0.1)]), POLICY)
    ana, _ = queue.add_reviewer("ana")
    boss, _ = queue.add_reviewer("boss", role="admin")
    task = queue.claim("p", ana.id)
    queue.submit(task.id, ana.id, text="Hola.", lang="es-ES")
    with pytest.raises(QueueError, match="only an admin"):
        queue.reopen(task.id, ana.id)
    queue.reopen(task.id, boss.id, note="typo")
    queue.reassign(task.id, boss.id, ana.id)
    assert queue.claim("p", ana.id).id == task.id
    queue.revoke_reviewer("ana")
    assert queue.authenticate("anything") is None
    with pytest.raises(QueueError, match="unknown or revoked"):
        queue.claim("p", ana.id)


def test_two_reviewers_racing_never_hold_the_same_task(queue: ReviewQueue, tmp_path: Path) -> None:
    route_table(queue, "p", write_labels(tmp_path / "a.parquet", [label(i, conf=0.1) for i in range(40)]), POLICY)
    reviewers = [queue.add_reviewer(f"r{k}")[0].id for k in range(4)]
    done: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def work(rid: int) -> None:
        try:
            while (task := queue.claim("p", rid)) is not None:
                queue.submit(task.id, rid, text="ok", lang="es-ES")
                done.append((task.id, rid))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(rid,)) for rid in reviewers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(t for t, _ in done) == sorted(set(t for t, _ in done)) and len(done) == 40
    with queue.Session() as s:
        assert s.scalar(select(func.count()).where(Review.action == "submit")) == 40

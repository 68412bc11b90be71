"""Claim+submit throughput of the review queue with 1, 4 and 16 reviewer processes.

    .venv/bin/python benchmarks/queue_claims.py [--db postgresql://postgres@127.0.0.1/postgres] [--tasks 2000]

Each run gets a fresh database (PostgreSQL: a new database on the server; SQLite: a new file)
with ``--tasks`` review tasks, then N processes, each a reviewer, loop claim -> submit until the
queue is empty. Printed per N: operations (claim + submit pairs) per second, median of
``--repeats``, and the ratio to one reviewer; then a check that every task has exactly one
submit. The test suite's concurrency test uses :func:`reviewer_loop` too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def seed_tasks(url: str, n: int, *, project: str = "bench") -> None:
    """A project with ``n`` clips, all routed to review, inserted in bulk."""
    from sqlalchemy import insert

    from labeling.models import Clip, Project, Task
    from labeling.queue import ReviewQueue

    queue = ReviewQueue.connect(url)
    now = dt.datetime.now(dt.UTC)
    with queue.Session.begin() as s:
        project_row = Project(name=project)
        s.add(project_row)
        s.flush()
        clips = [
            {
                "project_id": project_row.id,
                "clip_id": f"c{i:07d}",
                "item_id": f"c{i:07d}",
                "source_uri": f"/a/{i}.flac",
                "offset_s": 0.0,
                "duration_s": 2.0,
                "status": "ok",
                "text": "hola",
                "text_raw": "hola <es-ES>",
                "lang_detected": "es-ES",
                "confidence": (i % 97) / 100,
                "decision": "review",
                "sentences": [],
                "words": [],
                "reasons": [],
                "label_history": [],
                "updated_at": now,
            }  # fmt: skip
            for i in range(n)
        ]
        s.execute(insert(Clip), clips)
        pks = [pk for (pk,) in s.execute(Clip.__table__.select().with_only_columns(Clip.id).order_by(Clip.id))]
        tasks = [
            {
                "project_id": project_row.id,
                "clip_pk": pk,
                "state": "open",
                "lang": "es-ES",
                "priority": (i % 97) / 100,
                "version": 0,
                "created_at": now,
                "updated_at": now,
            }  # fmt: skip
            for i, pk in enumerate(pks)
        ]
        s.execute(insert(Task), tasks)
    queue.engine.dispose()


def reviewer_loop(url: str, reviewer_id: int, project: str, abandon_every: int, lease_s: float, results) -> None:
    """Claim and submit until the queue is empty; every ``abandon_every``-th claim is dropped
    (never submitted, its short lease left to expire). Reports (claims, submits, abandoned)."""
    from labeling.queue import QueueError, ReviewQueue

    queue = ReviewQueue.connect(url, migrate=False)
    claims = submits = abandoned = 0
    idle_since = None
    while True:
        short = abandon_every and (claims + 1) % abandon_every == 0
        task = queue.claim(project, reviewer_id, lease_s=0.3 if short else lease_s)
        if task is None:
            # abandoned tasks come back when their lease runs out: wait a little for them
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 2.0:
                break
            time.sleep(0.1)
            continue
        idle_since = None
        claims += 1
        if short:
            abandoned += 1
            time.sleep(0.35)  # let it expire, then take something else (maybe this one again)
            continue
        try:
            queue.submit(task.id, reviewer_id, text=f"checked by {reviewer_id}", lang="es-ES")
            submits += 1
        except QueueError:
            pass  # our lease expired under us and someone else has it: the queue refused, correctly
    queue.engine.dispose()
    results.put((reviewer_id, claims, submits, abandoned))


def run_reviewers(url: str, n: int, *, project: str = "bench", abandon_every: int = 0, lease_s: float = 60.0) -> dict:
    from labeling.queue import ReviewQueue

    queue = ReviewQueue.connect(url, migrate=False)
    ids = [queue.add_reviewer(f"r{uuid.uuid4().hex[:8]}")[0].id for _ in range(n)]
    queue.engine.dispose()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=reviewer_loop, args=(url, rid, project, abandon_every, lease_s, results)) for rid in ids
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    out = [results.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    return {
        "reviewers": n,
        "wall_s": wall,
        "claims": sum(o[1] for o in out),
        "submits": sum(o[2] for o in out),
        "abandoned": sum(o[3] for o in out),
    }


def fresh_database(admin_url: str) -> tuple[str, object]:
    if admin_url.startswith("sqlite"):
        folder = tempfile.mkdtemp()
        return f"sqlite:///{folder}/bench.db", None
    import psycopg

    name = f"earmark_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{admin_url.rsplit('/', 1)[0]}/{name}", name


def drop_database(admin_url: str, name: object) -> None:
    if name is None:
        return
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--db", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL (or sqlite://)"
    )
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--reviewers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from sqlalchemy import func, select

    from labeling.models import Review
    from labeling.queue import ReviewQueue

    rates: dict[int, list[float]] = {}
    for n in args.reviewers:
        for _ in range(args.repeats):
            url, name = fresh_database(args.db)
            try:
                seed_tasks(url, args.tasks)
                result = run_reviewers(url, n)
                queue = ReviewQueue.connect(url, migrate=False)
                with queue.Session() as s:
                    submits = s.scalar(
                        select(func.count(func.distinct(Review.task_id))).where(Review.action == "submit")
                    )
                    total = s.scalar(select(func.count()).where(Review.action == "submit"))
                queue.engine.dispose()
                assert submits == total == args.tasks, (submits, total)
                rate = result["submits"] / result["wall_s"]
                rates.setdefault(n, []).append(rate)
                print(
                    f"{n:2d} reviewers: {result['submits']} claim+submit in {result['wall_s']:.1f} s -> {rate:.0f} ops/s",
                    flush=True,
                )
            finally:
                drop_database(args.db, name)
    base = statistics.median(rates[args.reviewers[0]])
    print(
        f"\n{'reviewers':>9s} {'claim+submit/s (median)':>24s} {'ratio':>6s}   every task submitted exactly once: yes"
    )
    for n, values in rates.items():
        print(f"{n:9d} {statistics.median(values):24.0f} {statistics.median(values) / base:6.2f}")


if __name__ == "__main__":
    main()

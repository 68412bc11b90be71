"""16 reviewer processes race over 2,000 tasks on the real PostgreSQL server."""

from __future__ import annotations

from collections import defaultdict

import pytest
from sqlalchemy import select

from benchmarks.queue_claims import run_reviewers, seed_tasks
from labeling.models import Review, Task
from labeling.queue import ReviewQueue

pytestmark = pytest.mark.slow


def test_sixteen_reviewers_race_and_every_task_ends_with_exactly_one_review(pg_url: str) -> None:
    seed_tasks(pg_url, 2000)

    result = run_reviewers(pg_url, 16, abandon_every=40, lease_s=60.0)

    queue = ReviewQueue.connect(pg_url, migrate=False)
    with queue.Session() as s:
        states = set(s.scalars(select(Task.state)))
        actions = s.execute(select(Review.task_id, Review.reviewer_id, Review.action).order_by(Review.id)).all()
    assert states == {"done"}
    submits = defaultdict(int)
    holder: dict[int, int | None] = {}
    for task_id, reviewer_id, action in actions:
        if action == "claim":  # nobody may claim a task someone else holds
            assert holder.get(task_id) is None, (
                f"task {task_id} claimed by {reviewer_id} while {holder[task_id]} held it"
            )
            holder[task_id] = reviewer_id
        elif action == "expire":
            holder[task_id] = None
        elif action == "submit":
            assert holder.get(task_id) == reviewer_id, f"task {task_id} submitted by {reviewer_id}, not its holder"
            submits[task_id] += 1
            holder[task_id] = None
    assert len(submits) == 2000 and set(submits.values()) == {1}
    assert result["submits"] == 2000
    expired = sum(1 for _, _, a in actions if a == "expire")
    assert result["abandoned"] > 0 and expired > 0  # abandoned claims came back through their leases

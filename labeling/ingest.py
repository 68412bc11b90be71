"""``earmark route``: pseudo-labels (Parquet) -> routed clips and review tasks, in bulk.

Two streaming passes over the Parquet table (a file, a folder of parts, local or ``s3://``):

1. every row is checked against the policy; only the review candidates' ``(clip_id, language,
   confidence)`` are kept, and the review budget picks among them;
2. rows go to the database in batches: new clips are inserted in bulk, clips whose label did not
   change are left alone (routing the same table twice changes nothing), clips with a newer label
   are updated with the old one appended to ``label_history``; review tasks are created for the
   routed clips that have none. Reviews already done are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import any_, bindparam, insert, select
from sqlalchemy.dialects import postgresql

from cluster import storage
from labeling.models import Clip, Run, Task, utcnow
from labeling.policy import ACCEPT, REJECT, REVIEW, Decision, Policy, budget_keep, check
from labeling.queue import ReviewQueue

log = logging.getLogger(__name__)

LABEL_COLUMNS = (
    "clip_id", "item_id", "source_uri", "offset_s", "duration_s", "status", "error", "text", "text_raw",
    "lang_requested", "lang_detected", "confidence", "sentences", "words", "model_id", "run_id",
)  # fmt: skip


@dataclass
class RouteReport:
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    tasks_created: int = 0
    decisions: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


POLICY_COLUMNS = (
    "clip_id", "status", "error", "text", "duration_s", "lang_requested", "lang_detected", "confidence",
    "sentences", "words",
)  # fmt: skip


def read_batches(
    source: str,
    *,
    batch_rows: int,
    options: storage.StorageOptions | None = None,
    columns: tuple[str, ...] = LABEL_COLUMNS,
) -> Iterator[list[dict]]:
    """Rows of the pseudo-label table at ``source`` in lists of ``batch_rows`` (streamed)."""
    import pyarrow.dataset as pads

    fs, path = storage.pyarrow_filesystem(source, options)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    for batch in dataset.to_batches(columns=list(columns), batch_size=batch_rows):
        yield batch.to_pylist()


def route_table(
    queue: ReviewQueue,
    project: str,
    source: str,
    policy: Policy,
    *,
    batch_rows: int = 10_000,
    options: storage.StorageOptions | None = None,
) -> RouteReport:
    report = RouteReport(decisions={})
    # pass 1: the budget needs every review candidate before any is chosen. The verdicts of the
    # rows that are not plainly accepted are kept for pass 2 (accepted rows, the bulk, cost nothing).
    candidates: list[Decision] = []
    verdicts: dict[str, tuple[str, tuple[str, ...]]] = {}
    total = 0
    for rows in read_batches(source, batch_rows=batch_rows, options=options, columns=POLICY_COLUMNS):
        total += len(rows)
        for row in rows:
            decision, reasons = check(row, policy)
            if decision != ACCEPT:
                verdicts[row["clip_id"]] = decision, reasons
            if decision == REVIEW:
                candidates.append(Decision(row["clip_id"], REVIEW, (), row.get("lang_detected"), _priority(row)))
    kept = budget_keep(candidates, total=total, policy=policy)
    del candidates
    # pass 2: write
    with queue.Session.begin() as s:
        pid = queue.project_id(s, project, create=True)
    runs: dict[str, int] = {}
    for rows in read_batches(source, batch_rows=batch_rows, options=options):
        with queue.Session.begin() as s:
            for row in rows:
                run_id = row["run_id"]
                if run_id not in runs:
                    runs[run_id] = _run_pk(s, pid, run_id, row.get("model_id"), source)
            _write_batch(s, pid, rows, verdicts, kept, runs, report)
        report.rows += len(rows)
    return report


def _priority(row: dict) -> float:
    conf = row.get("confidence")
    return -1.0 if conf is None else float(conf)


def _run_pk(s: Any, pid: int, run_id: str, model_id: str | None, source: str) -> int:
    pk = s.scalar(select(Run.id).where(Run.project_id == pid, Run.run_id == run_id))
    if pk is None:
        run = Run(project_id=pid, run_id=run_id, model_id=model_id, source=source)
        s.add(run)
        s.flush()
        pk = run.id
    return pk


def _in(column: Any, values: list[Any], dialect: str) -> Any:
    """``column IN values``: one array parameter on PostgreSQL (``= ANY``), whose plan and parse
    cost do not grow with the list, instead of thousands of bind parameters."""
    if dialect == "postgresql":
        return column == any_(bindparam(None, values, type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


def _write_batch(
    s: Any,
    pid: int,
    rows: list[dict],
    verdicts: dict[str, tuple[str, tuple[str, ...]]],
    kept: set[str],
    runs: dict[str, int],
    report: RouteReport,
) -> None:
    dialect = s.bind.dialect.name
    ids = [r["clip_id"] for r in rows]
    existing = {
        cid: (pk, run_pk, text_raw, decision, reasons)
        for cid, pk, run_pk, text_raw, decision, reasons in s.execute(
            select(Clip.clip_id, Clip.id, Clip.run_pk, Clip.text_raw, Clip.decision, Clip.reasons).where(
                Clip.project_id == pid, _in(Clip.clip_id, ids, dialect)
            )
        )
    }
    new_rows, review_ids = [], []
    now = utcnow()
    for row in rows:
        decision, reasons = verdicts.get(row["clip_id"], (ACCEPT, ()))
        if decision == REVIEW and row["clip_id"] not in kept:
            decision, reasons = REJECT, (*reasons, "over the review budget")
        report.decisions[decision] = report.decisions.get(decision, 0) + 1  # type: ignore[index]
        run_pk = runs[row["run_id"]]
        old = existing.get(row["clip_id"])
        if old is None:
            new_rows.append(_clip_values(row, pid, run_pk, decision, list(reasons), now))
            report.inserted += 1
        elif old[1] == run_pk and old[2] == row["text_raw"]:
            if old[3] == decision and list(old[4] or ()) == list(reasons):
                report.unchanged += 1
            else:  # same label, another verdict (the policy or the budget changed)
                clip = s.get_one(Clip, old[0])
                clip.decision, clip.reasons = decision, list(reasons)
                report.updated += 1
        else:  # a newer label: the old one goes to the history
            clip = s.get_one(Clip, old[0])
            history = list(clip.label_history or [])
            history.append(
                {
                    "run_pk": clip.run_pk,
                    "model_id": clip.model_id,
                    "text_raw": clip.text_raw,
                    "confidence": clip.confidence,
                }
            )
            for key, value in _clip_values(row, pid, run_pk, decision, list(reasons), now).items():
                setattr(clip, key, value)
            clip.label_history = history
            report.updated += 1
        if decision == REVIEW:
            review_ids.append(row["clip_id"])
    if new_rows:
        bulk_insert(s, Clip, new_rows)
    if review_ids:
        pks = dict(
            s.execute(
                select(Clip.clip_id, Clip.id).where(Clip.project_id == pid, _in(Clip.clip_id, review_ids, dialect))
            ).all()
        )
        have = set(s.scalars(select(Task.clip_pk).where(_in(Task.clip_pk, list(pks.values()), dialect))))
        by_id = {r["clip_id"]: r for r in rows}
        tasks = [
            {
                "project_id": pid,
                "clip_pk": pk,
                "state": "open",
                "lang": by_id[cid].get("lang_detected") or by_id[cid].get("lang_requested"),
                "priority": _priority(by_id[cid]),
                "version": 0,
                "created_at": now,
                "updated_at": now,
            }
            for cid, pk in pks.items()
            if pk not in have
        ]
        if tasks:
            bulk_insert(s, Task, tasks)
            report.tasks_created += len(tasks)


def bulk_insert(s: Any, model: Any, rows: list[dict[str, Any]]) -> None:
    """Insert many rows: PostgreSQL's COPY (about ten times faster than multi-row INSERTs for
    wide rows with JSON; JSON written by orjson), a multi-row INSERT elsewhere. Runs inside the
    session's transaction."""
    if s.bind.dialect.name != "postgresql":
        s.execute(insert(model), rows)
        return
    table = model.__table__
    columns = [c.name for c in table.columns if c.name in rows[0]]
    is_json = [c.type.__class__.__name__ == "JSON" for c in table.columns if c.name in rows[0]]
    raw = s.connection().connection.driver_connection  # psycopg 3, same transaction
    with raw.cursor() as cur, cur.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(
                [orjson.dumps(row[c]).decode() if j else row[c] for c, j in zip(columns, is_json, strict=True)]
            )


def _clip_values(row: dict, pid: int, run_pk: int, decision: str, reasons: list, now: Any) -> dict[str, Any]:
    return {
        "project_id": pid,
        "clip_id": row["clip_id"],
        "item_id": row["item_id"],
        "source_uri": row["source_uri"],
        "offset_s": row["offset_s"],
        "duration_s": row["duration_s"],
        "status": row["status"],
        "error": row["error"],
        "text": row["text"],
        "text_raw": row["text_raw"],
        "lang_requested": row["lang_requested"],
        "lang_detected": row["lang_detected"],
        "confidence": row["confidence"],
        "sentences": row["sentences"] or [],
        "words": row["words"] or [],
        "model_id": row["model_id"],
        "run_pk": run_pk,
        "decision": decision,
        "reasons": reasons,
        "label_history": [],
        "updated_at": now,
    }

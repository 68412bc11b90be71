"""``earmark route``: pseudo-labels (Parquet) -> routed clips and review tasks, in bulk.

Two streaming passes over the Parquet table (a file, a folder of parts, local or ``s3://``):

1. every row is decided by the policy (:func:`labeling.policy.decide`); the decisions that are
   not plain accepts are kept, and the review budget (:func:`labeling.policy.budget_keep`) picks
   among the review candidates;
2. rows go to the database in batches, each with its decision within the budget
   (:func:`labeling.policy.within_budget`): new clips are inserted in bulk, clips whose label did
   not change are left alone (routing the same table twice changes nothing), clips with a newer
   label are updated with the old one appended to ``label_history``; review tasks are created for
   the routed clips that have none. Reviews already done are never touched.

With :mod:`labeling.queue` this is one of the two modules that write the review database: this
one writes routed clips, runs and new tasks in bulk; the queue writes everything reviewers and
admins do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from sqlalchemy import any_, bindparam, insert, select
from sqlalchemy.dialects import postgresql

from cluster import storage
from labeling.models import Clip, Run, Task, utcnow
from labeling.policy import ACCEPT, REVIEW, Decision, Policy, budget_keep, decide, priority, within_budget
from labeling.queue import ReviewQueue
from records.pseudo_labels import COLUMNS, PseudoLabel, from_table

log = logging.getLogger(__name__)


@dataclass
class RouteReport:
    """What ``earmark route`` did: rows read, clips written, decisions taken."""

    rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    tasks_created: int = 0
    decisions: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_batches(
    source: str, *, batch_rows: int, options: storage.StorageOptions | None = None
) -> Iterator[list[PseudoLabel]]:
    """The pseudo-label table at ``source`` in lists of ``batch_rows`` records (streamed)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    fs, path = storage.pyarrow_filesystem(source, options)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    for batch in dataset.to_batches(batch_size=batch_rows):
        yield from_table(pa.Table.from_batches([batch]))


def route_table(
    queue: ReviewQueue,
    project: str,
    source: str,
    policy: Policy,
    *,
    batch_rows: int = 10_000,
    options: storage.StorageOptions | None = None,
) -> RouteReport:
    report = RouteReport()
    # pass 1: the budget needs every review candidate before any is chosen. The verdicts of the
    # rows that are not plainly accepted are kept for pass 2 (accepted rows, the bulk, cost nothing).
    verdicts: dict[str, Decision] = {}
    total = 0
    for labels in read_batches(source, batch_rows=batch_rows, options=options):
        total += len(labels)
        for label in labels:
            decision = decide(label, policy)
            if decision.decision != ACCEPT:
                verdicts[label.clip_id] = decision
    kept = budget_keep((d for d in verdicts.values() if d.decision == REVIEW), total=total, policy=policy)
    # pass 2: write
    with queue.Session.begin() as s:
        pid = queue.project_id(s, project, create=True)
    runs: dict[str, int] = {}
    for labels in read_batches(source, batch_rows=batch_rows, options=options):
        with queue.Session.begin() as s:
            for label in labels:
                if label.run_id not in runs:
                    runs[label.run_id] = _run_pk(s, pid, label.run_id, label.model_id, source)
            decisions = [within_budget(verdicts.get(label.clip_id) or _accepted(label), kept) for label in labels]
            _write_batch(s, pid, labels, decisions, runs, report)
        report.rows += len(labels)
    return report


def _accepted(label: PseudoLabel) -> Decision:
    return Decision(label.clip_id, ACCEPT, (), label.lang_detected, priority(label))


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
    labels: list[PseudoLabel],
    decisions: list[Decision],
    runs: dict[str, int],
    report: RouteReport,
) -> None:
    dialect = s.bind.dialect.name
    ids = [label.clip_id for label in labels]
    existing = {
        cid: (pk, run_pk, text_raw, decision, reasons)
        for cid, pk, run_pk, text_raw, decision, reasons in s.execute(
            select(Clip.clip_id, Clip.id, Clip.run_pk, Clip.text_raw, Clip.decision, Clip.reasons).where(
                Clip.project_id == pid, _in(Clip.clip_id, ids, dialect)
            )
        )
    }
    new_rows, review = [], {}
    now = utcnow()
    for label, verdict in zip(labels, decisions, strict=True):
        decision, reasons = verdict.decision, list(verdict.reasons)
        report.decisions[decision] = report.decisions.get(decision, 0) + 1
        run_pk = runs[label.run_id]
        old = existing.get(label.clip_id)
        if old is None:
            new_rows.append(_clip_values(label, pid, run_pk, decision, reasons, now))
            report.inserted += 1
        elif old[1] == run_pk and old[2] == label.text_raw:
            if old[3] == decision and list(old[4] or ()) == reasons:
                report.unchanged += 1
            else:  # same label, another verdict (the policy or the budget changed)
                clip = s.get_one(Clip, old[0])
                clip.decision, clip.reasons = decision, reasons
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
            for key, value in _clip_values(label, pid, run_pk, decision, reasons, now).items():
                setattr(clip, key, value)
            clip.label_history = history
            report.updated += 1
        if decision == REVIEW:
            review[label.clip_id] = (label, verdict)
    if new_rows:
        bulk_insert(s, Clip, new_rows)
    if review:
        pks = dict(
            s.execute(
                select(Clip.clip_id, Clip.id).where(Clip.project_id == pid, _in(Clip.clip_id, list(review), dialect))
            ).all()
        )
        have = set(s.scalars(select(Task.clip_pk).where(_in(Task.clip_pk, list(pks.values()), dialect))))
        tasks = [
            {
                "project_id": pid,
                "clip_pk": pk,
                "state": "open",
                "lang": review[cid][0].lang_detected or review[cid][0].lang_requested,
                "priority": review[cid][1].task_priority,
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


def _clip_values(
    label: PseudoLabel, pid: int, run_pk: int, decision: str, reasons: list[str], now: Any
) -> dict[str, Any]:
    """The ``clips`` row of a routed pseudo-label: the label's fields the table keeps, by name."""
    row = label.to_row()
    return {name: row[name] for name in _LABEL_FIELDS} | {
        "project_id": pid,
        "run_pk": run_pk,
        "decision": decision,
        "reasons": reasons,
        "label_history": [],
        "updated_at": now,
    }


#: The pseudo-label fields the ``clips`` table keeps (its columns named like the record's).
_LABEL_FIELDS = tuple(c.name for c in Clip.__table__.columns if c.name in COLUMNS)

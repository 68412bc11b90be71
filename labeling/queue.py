"""Queue operations: everything reviewers and admins do to the review database (the web app and
the CLI call these; with :mod:`labeling.ingest`, which writes routed clips in bulk, the only
modules that write it).

>>> q = ReviewQueue.connect("sqlite:///review.db")                     # doctest: +SKIP
>>> reviewer, token = q.add_reviewer("ana")                              # doctest: +SKIP
>>> task = q.claim("calls-2026", reviewer.id, lang="de-DE")             # doctest: +SKIP
>>> q.submit(task.id, reviewer.id, text="Guten Morgen.", lang="de-DE")   # doctest: +SKIP

Claims are safe under concurrency: on PostgreSQL the next task is picked with
``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite every transaction starts with ``BEGIN IMMEDIATE``
(one writer at a time), which gives the same guarantee. A claim holds a lease; an expired lease
returns the task to the queue. Every action appends a row to ``reviews``: nothing is overwritten
without history.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, exists, func, or_, select
from sqlalchemy.orm import Session

from labeling.db import make_engine, schema_revisions, sessions, upgrade
from labeling.models import Clip, Project, Review, Reviewer, Task, utcnow
from records.text import normalize

FLAGS = ("unusable_audio", "not_speech", "wrong_language", "partial")
ROLES = ("reviewer", "admin")


class QueueError(ValueError):
    """An operation that cannot be done as asked (wrong task, lost lease, unknown reviewer...)."""


@dataclass(frozen=True, slots=True)
class TaskView:
    """A claimed task as a reviewer sees it."""

    id: int
    version: int
    clip_id: str
    source_uri: str
    offset_s: float
    duration_s: float | None
    text: str | None
    text_raw: str | None
    lang: str | None
    confidence: float | None
    words: list[Any]
    sentences: list[Any]
    reasons: list[Any]
    lease_expires_at: dt.datetime | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ReviewQueue:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.Session = sessions(engine)

    @classmethod
    def connect(cls, url: str, *, migrate: bool = True) -> ReviewQueue:
        """Open the queue at ``url``; ``migrate=False`` (an app whose migration runs apart, as in a
        Deployment's init container) refuses a schema that is not at the package's head."""
        engine = make_engine(url)
        if migrate:
            upgrade(engine)
        else:
            current, head = schema_revisions(engine)
            if current != head:
                raise QueueError(
                    f"the review database is at schema revision {current or 'none (empty)'} and this earmark needs "
                    f"{head}: run `earmark queue migrate --db ...` first"
                )
        return cls(engine)

    # -- projects and reviewers ----------------------------------------------------------

    def project_id(self, session: Session, name: str, *, create: bool = False) -> int:
        pid = session.scalar(select(Project.id).where(Project.name == name))
        if pid is None:
            if not create:
                raise QueueError(f"no project named {name!r}; route pseudo-labels into it first (earmark route)")
            project = Project(name=name)
            session.add(project)
            session.flush()
            pid = project.id
        return pid

    def add_reviewer(self, name: str, *, role: str = "reviewer") -> tuple[Reviewer, str]:
        """Create a reviewer; returns it and its token (shown once; only its hash is kept)."""
        if role not in ROLES:
            raise QueueError(f"role {role!r} is not one of {ROLES}")
        token = secrets.token_urlsafe(24)
        with self.Session.begin() as s:
            if s.scalar(select(Reviewer.id).where(Reviewer.name == name)) is not None:
                raise QueueError(f"a reviewer named {name!r} exists; revoke it or pick another name")
            reviewer = Reviewer(name=name, token_hash=hash_token(token), role=role)
            s.add(reviewer)
        return reviewer, token

    def reviewers(self) -> list[Reviewer]:
        with self.Session() as s:
            return list(s.scalars(select(Reviewer).order_by(Reviewer.id)))

    def revoke_reviewer(self, name: str) -> None:
        with self.Session.begin() as s:
            reviewer = s.scalar(select(Reviewer).where(Reviewer.name == name))
            if reviewer is None:
                raise QueueError(f"no reviewer named {name!r}")
            reviewer.active = False
            reviewer.revoked_at = utcnow()
            # their claims go back to the queue
            for task in s.scalars(select(Task).where(Task.claimed_by == reviewer.id, Task.state == "claimed")):
                self._log(s, task, reviewer.id, "release", note="reviewer revoked")
                _free(task)

    def authenticate(self, token: str) -> Reviewer | None:
        with self.Session() as s:
            return s.scalar(select(Reviewer).where(Reviewer.token_hash == hash_token(token), Reviewer.active))

    # -- claiming and answering ----------------------------------------------------------

    def claim(
        self, project: str, reviewer_id: int, *, lang: str | None = None, lease_s: float = 600.0
    ) -> TaskView | None:
        """The reviewer's current task, or the most urgent free one (None when the queue is empty)."""
        now = utcnow()
        with self.Session.begin() as s:
            pid = self.project_id(s, project)
            self._active_reviewer(s, reviewer_id)
            held = s.scalar(
                select(Task).where(
                    Task.project_id == pid,
                    Task.state == "claimed",
                    Task.claimed_by == reviewer_id,
                    Task.lease_expires_at > now,
                )
            )
            if held is not None:
                return self._view(s, held)
            skipped = exists().where(
                Review.task_id == Task.id, Review.reviewer_id == reviewer_id, Review.action == "skip"
            )
            query = (
                select(Task)
                .where(
                    Task.project_id == pid,
                    or_(Task.state == "open", and_(Task.state == "claimed", Task.lease_expires_at <= now)),
                    ~skipped,
                )
                .order_by(Task.priority, Task.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if lang:
                query = query.where(Task.lang == lang)
            task = s.scalar(query)
            if task is None:
                return None
            if task.state == "claimed":  # an abandoned claim: its lease ran out
                self._log(s, task, task.claimed_by, "expire")
            task.state, task.claimed_by = "claimed", reviewer_id
            task.lease_expires_at = now + dt.timedelta(seconds=lease_s)
            task.version += 1
            self._log(s, task, reviewer_id, "claim")
            s.flush()
            return self._view(s, task)

    def submit(
        self,
        task_id: int,
        reviewer_id: int,
        *,
        text: str,
        lang: str | None,
        flags: tuple[str, ...] | list[str] = (),
        note: str | None = None,
    ) -> None:
        """Record the reviewer's correction; the task is done. Idempotent: the same submit sent
        again (a client retrying after a lost response) changes nothing and succeeds."""
        bad = [f for f in flags if f not in FLAGS]
        if bad:
            raise QueueError(f"unknown flags {bad}; use {list(FLAGS)}")
        with self.Session.begin() as s:
            if self._already_submitted(s, task_id, reviewer_id, text, lang, list(flags)):
                return
            task = self._held(s, task_id, reviewer_id)
            self._record_submit(s, task, s.get_one(Clip, task.clip_pk), reviewer_id, text, lang, list(flags), note)

    def skip(self, task_id: int, reviewer_id: int) -> None:
        """Give the task back; this reviewer will not be offered it again."""
        with self.Session.begin() as s:
            task = self._held(s, task_id, reviewer_id)
            self._log(s, task, reviewer_id, "skip")
            _free(task)

    def release(self, task_id: int, reviewer_id: int) -> None:
        """Give the task back to the queue (anyone may take it, this reviewer included)."""
        with self.Session.begin() as s:
            task = self._held(s, task_id, reviewer_id)
            self._log(s, task, reviewer_id, "release")
            _free(task)

    def reopen(self, task_id: int, admin_id: int, *, note: str | None = None) -> None:
        """Admin: put a done task back in the queue (its earlier reviews stay)."""
        with self.Session.begin() as s:
            self._admin(s, admin_id)
            task = self._task(s, task_id)
            self._log(s, task, admin_id, "reopen", note=note)
            _free(task)

    def reassign(self, task_id: int, admin_id: int, to_reviewer_id: int, *, lease_s: float = 600.0) -> None:
        """Admin: hand a task to another reviewer (with a fresh lease)."""
        with self.Session.begin() as s:
            self._admin(s, admin_id)
            self._active_reviewer(s, to_reviewer_id)
            task = self._task(s, task_id)
            if task.state == "done":
                raise QueueError(f"task {task_id} is done; reopen it first")
            self._log(s, task, admin_id, "reassign", note=f"to reviewer {to_reviewer_id}")
            task.state, task.claimed_by = "claimed", to_reviewer_id
            task.lease_expires_at = utcnow() + dt.timedelta(seconds=lease_s)
            task.version += 1

    def take_back(self, project: str, reviewer_id: int, *, lease_s: float = 600.0) -> TaskView | None:
        """The reviewer's last submitted task, claimed again to fix it (the "back" button);
        their current task, if any, is released first. The new submit supersedes the old one."""
        with self.Session.begin() as s:
            pid = self.project_id(s, project)
            last = s.execute(
                select(Review.task_id)
                .join(Task, Task.id == Review.task_id)
                .where(
                    Task.project_id == pid,
                    Review.reviewer_id == reviewer_id,
                    Review.action == "submit",
                    Task.state == "done",
                )
                .order_by(Review.id.desc())
                .limit(1)
            ).scalar()
            if last is None:
                return None
            for held in s.scalars(select(Task).where(Task.claimed_by == reviewer_id, Task.state == "claimed")):
                self._log(s, held, reviewer_id, "release", note="went back")
                _free(held)
            task = self._task(s, last)
            self._log(s, task, reviewer_id, "back")
            task.state, task.claimed_by = "claimed", reviewer_id
            task.lease_expires_at = utcnow() + dt.timedelta(seconds=lease_s)
            task.version += 1
            s.flush()
            return self._view(s, task)

    def record_external_review(
        self, project: str, clip_id: str, reviewer_id: int, *, text: str, lang: str | None, note: str
    ) -> bool:
        """A correction made outside earmark (a Label Studio annotation): the clip's task is
        created if needed and closed with this review. False when the project has no such clip."""
        with self.Session.begin() as s:
            pid = self.project_id(s, project)
            clip = s.scalar(select(Clip).where(Clip.project_id == pid, Clip.clip_id == clip_id))
            if clip is None:
                return False
            task = s.scalar(select(Task).where(Task.clip_pk == clip.id).with_for_update())
            if task is None:
                task = Task(project_id=pid, clip_pk=clip.id, state="open", lang=clip.lang_detected, priority=0.0)
                s.add(task)
                s.flush()
            self._record_submit(s, task, clip, reviewer_id, text, lang, [], note)
            return True

    def progress(self, project: str) -> dict[str, Any]:
        """Counts per language and state, each reviewer's throughput, agreement between reviewers."""
        out = self.stats(project)
        with self.Session() as s:
            pid = self.project_id(s, project)
            rows = s.execute(
                select(
                    Reviewer.name, Review.action, Review.task_id, Review.clip_pk, Review.text_after, Review.created_at
                )
                .join(Reviewer, Reviewer.id == Review.reviewer_id)
                .join(Task, Task.id == Review.task_id)
                .where(Task.project_id == pid)
                .order_by(Review.id)
            ).all()
        claimed_at: dict[tuple[str, int], dt.datetime] = {}
        people: dict[str, dict[str, Any]] = {}
        texts: dict[int, dict[str, str]] = {}
        for name, action, task_id, clip_pk, text_after, at in rows:
            p = people.setdefault(name, {"submits": 0, "skips": 0, "seconds": []})
            if action in ("claim", "back"):
                claimed_at[(name, task_id)] = at
            elif action == "submit":
                p["submits"] += 1
                if (name, task_id) in claimed_at:
                    p["seconds"].append((_aware(at) - _aware(claimed_at.pop((name, task_id)))).total_seconds())
                texts.setdefault(clip_pk, {})[name] = normalize(text_after or "")
            elif action == "skip":
                p["skips"] += 1
        reviewers = {}
        for name, p in people.items():
            secs = sorted(p["seconds"])
            median = secs[len(secs) // 2] if secs else None
            reviewers[name] = {
                "submits": p["submits"],
                "skips": p["skips"],
                "median_seconds_per_task": median,
                "tasks_per_hour": 3600 / median if median else None,
            }
        shared = [t for t in texts.values() if len(t) >= 2]
        agree = sum(1 for t in shared if len(set(t.values())) == 1)
        out["reviewers"] = reviewers
        out["agreement"] = {
            "clips_seen_by_two_or_more": len(shared),
            "identical": agree,
            "rate": agree / len(shared) if shared else None,
        }
        return out

    def reviews_table(self, project: str) -> list[dict[str, Any]]:
        """Every review row of the project (for CSV/JSON download), oldest first."""
        with self.Session() as s:
            pid = self.project_id(s, project)
            rows = s.execute(
                select(Review, Clip.clip_id, Reviewer.name)
                .join(Clip, Clip.id == Review.clip_pk)
                .outerjoin(Reviewer, Reviewer.id == Review.reviewer_id)
                .where(Clip.project_id == pid)
                .order_by(Review.id)
            ).all()
        return [
            {
                "review_id": r.id,
                "task_id": r.task_id,
                "clip_id": clip_id,
                "reviewer": name,
                "action": r.action,
                "text_before": r.text_before,
                "text_after": r.text_after,
                "lang_before": r.lang_before,
                "lang_after": r.lang_after,
                "flags": ",".join(r.flags or []),
                "note": r.note,
                "created_at": _aware(r.created_at).isoformat(),
            }  # fmt: skip
            for r, clip_id, name in rows
        ]

    def clip(self, project: str, clip_id: str) -> Clip | None:
        with self.Session() as s:
            pid = self.project_id(s, project)
            return s.scalar(select(Clip).where(Clip.project_id == pid, Clip.clip_id == clip_id))

    def projects(self) -> list[str]:
        with self.Session() as s:
            return list(s.scalars(select(Project.name).order_by(Project.name)))

    def stats(self, project: str) -> dict[str, Any]:
        """Tasks per state and language, clips per decision."""
        with self.Session() as s:
            pid = self.project_id(s, project)
            tasks = s.execute(
                select(Task.lang, Task.state, func.count())
                .where(Task.project_id == pid)
                .group_by(Task.lang, Task.state)
            ).all()
            decisions = s.execute(
                select(Clip.decision, func.count()).where(Clip.project_id == pid).group_by(Clip.decision)
            ).all()
        per_lang: dict[str, dict[str, int]] = {}
        for lang, state, n in tasks:
            per_lang.setdefault(lang or "-", {})[state] = n
        return {"project": project, "clips": dict(decisions), "tasks": per_lang}

    # -- helpers -------------------------------------------------------------------------

    def _task(self, s: Session, task_id: int) -> Task:
        task = s.scalar(select(Task).where(Task.id == task_id).with_for_update())
        if task is None:
            raise QueueError(f"no task {task_id}")
        return task

    def _already_submitted(
        self, s: Session, task_id: int, reviewer_id: int, text: str, lang: str | None, flags: list[str]
    ) -> bool:
        """Whether ``task_id`` is done and its last submit is this very one (by this reviewer,
        with this text, language and flags)."""
        task = self._task(s, task_id)
        if task.state != "done":
            return False
        last = s.execute(
            select(Review)
            .where(Review.task_id == task_id, Review.action == "submit")
            .order_by(Review.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        return (
            last is not None
            and last.reviewer_id == reviewer_id
            and (last.text_after, last.lang_after, list(last.flags or [])) == (text, lang, flags)
        )

    def _held(self, s: Session, task_id: int, reviewer_id: int) -> Task:
        task = self._task(s, task_id)
        if task.state != "claimed" or task.claimed_by != reviewer_id:
            raise QueueError(
                f"task {task_id} is not held by reviewer {reviewer_id} (its lease expired or it was reassigned); claim a new task"
            )
        return task

    def _active_reviewer(self, s: Session, reviewer_id: int) -> Reviewer:
        reviewer = s.get(Reviewer, reviewer_id)
        if reviewer is None or not reviewer.active:
            raise QueueError(f"reviewer {reviewer_id} is unknown or revoked")
        return reviewer

    def _admin(self, s: Session, admin_id: int) -> None:
        if self._active_reviewer(s, admin_id).role != "admin":
            raise QueueError("only an admin can do this")

    @staticmethod
    def _record_submit(
        s: Session,
        task: Task,
        clip: Clip,
        reviewer_id: int,
        text: str,
        lang: str | None,
        flags: list[str],
        note: str | None,
    ) -> None:
        s.add(
            Review(
                task_id=task.id,
                clip_pk=clip.id,
                reviewer_id=reviewer_id,
                action="submit",
                text_before=clip.text,
                text_after=text,
                lang_before=clip.lang_detected,
                lang_after=lang,
                flags=flags,
                note=note,
            )  # fmt: skip
        )
        task.state, task.claimed_by, task.lease_expires_at = "done", None, None
        task.version += 1

    @staticmethod
    def _log(s: Session, task: Task, reviewer_id: int | None, action: str, *, note: str | None = None) -> None:
        s.add(Review(task_id=task.id, clip_pk=task.clip_pk, reviewer_id=reviewer_id, action=action, note=note))

    @staticmethod
    def _view(s: Session, task: Task) -> TaskView:
        clip = s.get_one(Clip, task.clip_pk)
        return TaskView(
            id=task.id,
            version=task.version,
            clip_id=clip.clip_id,
            source_uri=clip.source_uri,
            offset_s=clip.offset_s,
            duration_s=clip.duration_s,
            text=clip.text,
            text_raw=clip.text_raw,
            lang=clip.lang_detected,
            confidence=clip.confidence,
            words=list(clip.words or []),
            sentences=list(clip.sentences or []),
            reasons=list(clip.reasons or []),
            lease_expires_at=task.lease_expires_at,
        )


def _free(task: Task) -> None:
    """Back to the queue: open, unclaimed, no lease."""
    task.state, task.claimed_by, task.lease_expires_at = "open", None, None
    task.version += 1


def _aware(at: dt.datetime) -> dt.datetime:
    """SQLite gives naive datetimes back; they were written in UTC."""
    return at if at.tzinfo else at.replace(tzinfo=dt.UTC)

"""The review queue's tables (SQLAlchemy 2.0 typed models).

The schema is created and upgraded by the Alembic migrations in ``labeling/migrations`` only
(:func:`labeling.db.upgrade`), never by ``create_all``. SQLite by default, PostgreSQL for teams.

* ``projects``: one per corpus or run set;
* ``runs``: a transcription run ingested into a project (its ``run_id`` and model);
* ``clips``: one per ``clip_id`` of the pseudo-label table, with the current label and the
  routing decision; a newer run of the same clip updates the label in place (the old label stays
  in ``label_history``);
* ``tasks``: one per clip routed to review, with its state and lease;
* ``reviewers``: people and their hashed tokens;
* ``reviews``: every action on a task (claim, submit, skip, release, reassign, reopen) with who,
  when, the text and language before and after, and the flags: the audit trail, append-only.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: DateTime(timezone=True), dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("project_id", "run_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    run_id: Mapped[str] = mapped_column(String(100))
    model_id: Mapped[str | None] = mapped_column(String(300))
    source: Mapped[str] = mapped_column(Text)
    ingested_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Clip(Base):
    __tablename__ = "clips"
    __table_args__ = (
        UniqueConstraint("project_id", "clip_id"),
        Index("ix_clips_project_decision", "project_id", "decision"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    clip_id: Mapped[str] = mapped_column(String(64))
    item_id: Mapped[str] = mapped_column(String(64))
    source_uri: Mapped[str] = mapped_column(Text)
    offset_s: Mapped[float] = mapped_column(Float)
    duration_s: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text)
    text_raw: Mapped[str | None] = mapped_column(Text)
    lang_requested: Mapped[str | None] = mapped_column(String(16))
    lang_detected: Mapped[str | None] = mapped_column(String(16))
    confidence: Mapped[float | None] = mapped_column(Float)
    sentences: Mapped[list[Any]] = mapped_column(default=list)
    words: Mapped[list[Any]] = mapped_column(default=list)
    model_id: Mapped[str | None] = mapped_column(String(300))
    run_pk: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    #: accept | review | reject, and why
    decision: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[list[Any]] = mapped_column(default=list)
    #: earlier labels of this clip from older runs: [{run_id, model_id, text_raw, confidence}]
    label_history: Mapped[list[Any]] = mapped_column(default=list)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Reviewer(Base):
    __tablename__ = "reviewers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    #: sha256 of the token (the token itself is shown once, never stored)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="reviewer")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column()


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_claimable", "project_id", "state", "lang", "priority"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    clip_pk: Mapped[int] = mapped_column(ForeignKey("clips.id"), unique=True)
    #: open | claimed | done
    state: Mapped[str] = mapped_column(String(16), default="open")
    lang: Mapped[str | None] = mapped_column(String(16))
    #: lower first (the utterance confidence)
    priority: Mapped[float] = mapped_column(Float, default=0.0)
    claimed_by: Mapped[int | None] = mapped_column(ForeignKey("reviewers.id"))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column()
    #: bumped by every change: a stale writer's UPDATE matches no row
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Review(Base):
    __tablename__ = "reviews"
    __table_args__ = (
        Index("ix_reviews_task", "task_id"),
        Index("ix_reviews_reviewer", "reviewer_id", "created_at"),
        Index("ix_reviews_reviewer_action_task", "reviewer_id", "action", "task_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    clip_pk: Mapped[int] = mapped_column(ForeignKey("clips.id"))
    reviewer_id: Mapped[int | None] = mapped_column(ForeignKey("reviewers.id"))
    #: claim | submit | skip | release | expire | reassign | reopen
    action: Mapped[str] = mapped_column(String(16))
    text_before: Mapped[str | None] = mapped_column(Text)
    text_after: Mapped[str | None] = mapped_column(Text)
    lang_before: Mapped[str | None] = mapped_column(String(16))
    lang_after: Mapped[str | None] = mapped_column(String(16))
    #: unusable_audio, not_speech, wrong_language, partial
    flags: Mapped[list[Any]] = mapped_column(default=list)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

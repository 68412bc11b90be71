"""reviews: index for "tasks this reviewer skipped" (the claim query's anti-join)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 14:55:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_reviews_reviewer_action_task", "reviews", ["reviewer_id", "action", "task_id"])


def downgrade() -> None:
    op.drop_index("ix_reviews_reviewer_action_task", table_name="reviews")

"""Sessions, messages, tasks' final state and usage per tenant per day.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINAL_STATUSES = "('completed', 'failed', 'cancelled', 'timed_out')"


def _moment(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _cost(name: str = "cost", *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.Numeric(20, 9), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        _moment("created_at"),
        _moment("last_activity_at"),
        _moment("erased_at", nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "session_id", name="sessions_pkey"),
    )
    op.create_index("sessions_last_activity", "sessions", ["last_activity_at"])

    op.create_table(
        "messages",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("task_id", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("part", sa.SmallInteger, nullable=False),
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("final_event_id", sa.Text),
        sa.Column("event_ms", sa.BigInteger, nullable=False),
        sa.Column("event_seq", sa.BigInteger, nullable=False),
        sa.Column("input_tokens", sa.BigInteger),
        sa.Column("output_tokens", sa.BigInteger),
        _cost(nullable=True),
        sa.Column("model", sa.Text),
        _moment("created_at"),
        _moment("completed_at"),
        _moment("first_chunk_at", nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "task_id", "role", name="messages_pkey"),
        sa.CheckConstraint("role IN ('user', 'assistant')", name="messages_role"),
        sa.CheckConstraint(
            "(role = 'user' AND part = 0) OR (role = 'assistant' AND part = 1)",
            name="messages_part",
        ),
        sa.CheckConstraint(f"status IN {FINAL_STATUSES}", name="messages_status"),
    )
    op.create_index(
        "messages_history",
        "messages",
        ["tenant_id", "session_id", "event_ms", "event_seq", "part"],
    )
    op.create_index("messages_completed_at", "messages", ["completed_at"])

    op.create_table(
        "tasks",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("task_id", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("error", JSONB),
        sa.Column("result", JSONB),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        _cost(),
        sa.Column("model", sa.Text),
        sa.Column("final_event_id", sa.Text),
        _moment("created_at"),
        _moment("updated_at"),
        sa.PrimaryKeyConstraint("tenant_id", "task_id", name="tasks_pkey"),
        sa.CheckConstraint(f"status IN {FINAL_STATUSES}", name="tasks_status"),
    )
    op.create_index("tasks_session", "tasks", ["tenant_id", "session_id"])
    op.create_index("tasks_updated_at", "tasks", ["updated_at"])

    op.create_table(
        "usage_events",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("task_id", sa.Text, nullable=False),
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        _cost(),
        sa.PrimaryKeyConstraint("tenant_id", "task_id", name="usage_events_pkey"),
    )
    op.create_index("usage_events_day", "usage_events", ["day"])

    op.create_table(
        "usage_daily",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        _cost(),
        sa.PrimaryKeyConstraint("tenant_id", "day", name="usage_daily_pkey"),
    )


def downgrade() -> None:
    for table in ("usage_daily", "usage_events", "tasks", "messages", "sessions"):
        op.drop_table(table)

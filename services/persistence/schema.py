"""The tables, as SQLAlchemy Core sees them (the migrations in `migrations/` create them).

Every row carries `tenant_id` and every key starts with it, so each query is scoped by tenant
and served by an index. Keys make every write of the writer idempotent:

- `messages`: (tenant, task, role): a task has at most one user and one assistant message.
- `tasks`: (tenant, task): a task's final state, written once.
- `usage_events`: (tenant, task): the marker that a task's usage was added to `usage_daily`;
  the daily sums only ever grow by rows this insert actually created.
- `usage_daily`: (tenant, day): the sums, updated in the transaction that adds the markers.
- `sessions`: (tenant, session): first and last activity, and when its history was erased.

History is ordered by the session log id of each task's final event (`event_ms`,
`event_seq`, compared as numbers), then the task id (tasks sharing an id: records written
without it sort at their completion millisecond), then `part` (0: the user's message, 1: the
answer).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

COST = Numeric()
"""Cost in the AES's currency unit, exactly as the AES wrote it: PostgreSQL's `numeric` with
no precision holds any decimal a JSON number can be, so daily sums are exact and equal the
sum of what clients were told. Numeric(38, 9) rounded each task's cost to 10^-9 (4 tasks of
2.5e-9 billed 8e-9, not 1e-8); Numeric(20, 9) overflowed at the hundredth task of the
contract's largest cost (10^9)."""

FINAL_STATUSES = "('completed', 'failed', 'cancelled', 'timed_out')"

metadata = MetaData(naming_convention={"pk": "%(table_name)s_pkey"})

sessions = Table(
    "sessions",
    metadata,
    Column("tenant_id", Text, primary_key=True),
    Column("session_id", Text, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_activity_at", DateTime(timezone=True), nullable=False),
    Column("erased_at", DateTime(timezone=True)),
    Index("sessions_last_activity", "last_activity_at"),
)

messages = Table(
    "messages",
    metadata,
    Column("tenant_id", Text, primary_key=True),
    Column("task_id", Text, primary_key=True),
    Column("role", Text, primary_key=True),
    Column("session_id", Text, nullable=False),
    Column("part", SmallInteger, nullable=False),
    Column("agent_id", Text, nullable=False),
    Column("user_id", Text),
    Column("content", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("final_event_id", Text),
    Column("event_ms", BigInteger, nullable=False),
    Column("event_seq", BigInteger, nullable=False),
    Column("input_tokens", BigInteger),
    Column("output_tokens", BigInteger),
    Column("cost", COST),
    Column("model", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True), nullable=False),
    Column("first_chunk_at", DateTime(timezone=True)),
    CheckConstraint("role IN ('user', 'assistant')", name="messages_role"),
    CheckConstraint(
        "(role = 'user' AND part = 0) OR (role = 'assistant' AND part = 1)", name="messages_part"
    ),
    CheckConstraint(f"status IN {FINAL_STATUSES}", name="messages_status"),
    Index(
        "messages_history", "tenant_id", "session_id", "event_ms", "event_seq", "task_id", "part"
    ),
    Index("messages_completed_at", "completed_at"),
    # `GET /api/sessions`: a user's messages grouped by session in index order (min, max and
    # count read from the index alone), and each listed session's first message found at the
    # head of its range. Without it the list read every message of the tenant.
    Index(
        "messages_user_sessions",
        "tenant_id",
        "user_id",
        "role",
        "session_id",
        "completed_at",
        "task_id",
        # Users the api accepts (a `sub` of at most 255 characters): a longer `user_id` of an
        # earlier version would exceed a btree row (2704 bytes) and fail the write, or this
        # migration on a history holding one.
        postgresql_where=text("length(user_id) <= 255"),
    ),
)

tasks = Table(
    "tasks",
    metadata,
    Column("tenant_id", Text, primary_key=True),
    Column("task_id", Text, primary_key=True),
    Column("session_id", Text, nullable=False),
    Column("agent_id", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("error", JSONB),
    Column("result", JSONB),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cost", COST, nullable=False),
    Column("model", Text),
    Column("final_event_id", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint(f"status IN {FINAL_STATUSES}", name="tasks_status"),
    Index("tasks_session", "tenant_id", "session_id"),
    Index("tasks_updated_at", "updated_at"),
)

usage_events = Table(
    "usage_events",
    metadata,
    Column("tenant_id", Text, primary_key=True),
    Column("task_id", Text, primary_key=True),
    Column("day", Date, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cost", COST, nullable=False),
    Index("usage_events_day", "day"),
)

usage_daily = Table(
    "usage_daily",
    metadata,
    Column("tenant_id", Text, primary_key=True),
    Column("day", Date, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cost", COST, nullable=False),
)

HISTORY_TABLES = (sessions, messages, tasks)
ALL_TABLES = (sessions, messages, tasks, usage_events, usage_daily)

"""The index of a user's sessions (`GET /api/sessions`).

The list groups the caller's own messages (tenant, user, role `user`) by session: this index
holds them in that order with the completion time and task id, so the counts and times come
from the index alone and each session's first message is the head of its range; without it,
the query read every message of the tenant.

`CREATE INDEX` (not `CONCURRENTLY`: `orchestrator migrate` runs in one transaction) holds
off the persistence writer while it builds; records wait in Redis and are written after.

Revision ID: 0005_user_sessions
Revises: 0004_exact_cost
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_user_sessions"
down_revision: str | None = "0004_exact_cost"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ["tenant_id", "user_id", "role", "session_id", "completed_at", "task_id"]


# The users the api accepts (`sub` of at most 255 characters): a longer `user_id` written by
# an earlier version would exceed a btree row (2704 bytes) and fail this migration.
WHERE = "length(user_id) <= 255"


def upgrade() -> None:
    op.create_index("messages_user_sessions", "messages", COLUMNS, postgresql_where=sa.text(WHERE))


def downgrade() -> None:
    op.drop_index("messages_user_sessions", table_name="messages")

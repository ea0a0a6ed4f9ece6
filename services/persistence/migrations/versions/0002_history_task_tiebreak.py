"""History's sort key breaks ties on the task id.

Records written without their final event id sort at their completion millisecond, so two
tasks can share (event_ms, event_seq); the task id orders them, and the paging index follows.

Revision ID: 0002_history_task_tiebreak
Revises: 0001_initial
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002_history_task_tiebreak"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = ["tenant_id", "session_id", "event_ms", "event_seq", "part"]
NEW = ["tenant_id", "session_id", "event_ms", "event_seq", "task_id", "part"]


def upgrade() -> None:
    op.drop_index("messages_history", table_name="messages")
    op.create_index("messages_history", "messages", NEW)


def downgrade() -> None:
    op.drop_index("messages_history", table_name="messages")
    op.create_index("messages_history", "messages", OLD)

"""Cost columns hold a day's sum of the contract's largest costs.

`usage_daily.cost` sums the costs of a tenant's day; at Numeric(20, 9) (11 digits before the
point) a hundred tasks at the contract's largest cost (10^9) overflowed, and the writer
dead-lettered the records whose usage would not fit, history and all. Numeric(38, 9) for
every cost column, so a task's cost and its day's sum have the same type.

Revision ID: 0003_wider_cost
Revises: 0002_history_task_tiebreak
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_wider_cost"
down_revision: str | None = "0002_history_task_tiebreak"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = [("messages", True), ("tasks", False), ("usage_events", False), ("usage_daily", False)]


def upgrade() -> None:
    for table, nullable in COLUMNS:
        op.alter_column(
            table,
            "cost",
            type_=sa.Numeric(38, 9),
            existing_type=sa.Numeric(20, 9),
            existing_nullable=nullable,
        )


def downgrade() -> None:
    for table, nullable in COLUMNS:
        op.alter_column(
            table,
            "cost",
            type_=sa.Numeric(20, 9),
            existing_type=sa.Numeric(38, 9),
            existing_nullable=nullable,
        )

"""Cost columns keep every digit of the cost an AES reported.

At Numeric(38, 9) each task's cost was rounded to 10^-9 before the day's sum: four tasks of
2.5e-9 were billed 8e-9 by `/api/usage` while their clients were told 1e-8 in all (and the
Redis counter said so too), and costs below 5e-10 became 0. PostgreSQL's `numeric` without a
precision holds any decimal a JSON number can be written as, so the sums are exact.

Revision ID: 0004_exact_cost
Revises: 0003_wider_cost
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_exact_cost"
down_revision: str | None = "0003_wider_cost"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = [("messages", True), ("tasks", False), ("usage_events", False), ("usage_daily", False)]


def upgrade() -> None:
    for table, nullable in COLUMNS:
        op.alter_column(
            table,
            "cost",
            type_=sa.Numeric(),
            existing_type=sa.Numeric(38, 9),
            existing_nullable=nullable,
        )


def downgrade() -> None:
    for table, nullable in COLUMNS:  # rounds to 10^-9 again
        op.alter_column(
            table,
            "cost",
            type_=sa.Numeric(38, 9),
            existing_type=sa.Numeric(),
            existing_nullable=nullable,
        )

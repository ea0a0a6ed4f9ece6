"""History retention: deleting what is older than `ORCHESTRATOR_HISTORY_RETENTION_DAYS`.

History (messages, tasks' final state, sessions idle since the cutoff) and the per-task usage
markers go; the daily usage sums stay (they hold no content and billing looks further back).
Deletes run in chunks of `CHUNK_ROWS`, each its own short transaction, so pruning a large
backlog never holds long locks against the writer.

Retention counts whole UTC days, as the writer does when it refuses a record past it
(`oldest_kept_day`): cut at the moment `now - N days` instead, prune deleted the tombstone of a
session erased earlier on the boundary day while the writer still accepted that day's records,
and a late record of the erased session wrote its conversation back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Table, delete, literal_column, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.persistence.schema import messages, sessions, tasks, usage_events

CHUNK_ROWS = 10_000
# Tombstones outlive the history around them by this much: a task started before midnight
# and finished after it is of the later day for the writer, its erasure of the earlier one.
TOMBSTONE_MARGIN = timedelta(days=1)


def oldest_kept_day(retention_days: int, now: datetime | None = None) -> date:
    """The first UTC day retention keeps; everything of the days before it is pruned."""
    return ((now or datetime.now(UTC)) - timedelta(days=retention_days)).date()


@dataclass(frozen=True, slots=True)
class PruneResult:
    cutoff: datetime
    deleted: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


async def _delete_chunked(engine: AsyncEngine, table: Table, old: ColumnElement[bool]) -> int:
    """Delete the rows matching `old`, `CHUNK_ROWS` at a time.

    Rows are picked by `ctid` inside the deleting statement: a row the writer updates while
    prune waits for its lock becomes a new version with another ctid, which PostgreSQL's
    re-check then finds not picked, so fresh activity is never deleted (picking by key
    would delete it).
    """
    ctid: Any = literal_column("ctid")
    chunk = select(ctid).select_from(table).where(old).limit(CHUNK_ROWS).scalar_subquery()
    total = 0
    while True:
        async with engine.begin() as conn:
            result = await conn.execute(delete(table).where(ctid.in_(chunk)))
        total += int(result.rowcount)
        if result.rowcount < CHUNK_ROWS:
            return total


async def prune(
    engine: AsyncEngine, retention_days: int, *, now: datetime | None = None
) -> PruneResult:
    """Delete history of the UTC days before `oldest_kept_day`; returns the rows deleted per
    table."""
    kept_from = oldest_kept_day(retention_days, now)
    cutoff = datetime.combine(kept_from, time.min, tzinfo=UTC)
    deleted = {
        "messages": await _delete_chunked(engine, messages, messages.c.completed_at < cutoff),
        "tasks": await _delete_chunked(engine, tasks, tasks.c.updated_at < cutoff),
        "usage_events": await _delete_chunked(engine, usage_events, usage_events.c.day < kept_from),
        "sessions": await _delete_chunked(
            engine, sessions, sessions.c.last_activity_at < cutoff - TOMBSTONE_MARGIN
        ),
    }
    return PruneResult(cutoff, deleted)

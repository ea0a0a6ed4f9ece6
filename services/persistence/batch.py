"""Writing a batch of records to PostgreSQL in one transaction, so that replaying it is harmless.

Order of the statements, each one multi-row (SQLAlchemy's insertmanyvalues on asyncpg):

1. upsert the sessions (first/last activity); the reply says which were erased, and records
   of tasks created before their session's erasure write no history;
2. insert messages and tasks, `ON CONFLICT DO NOTHING`: a replayed task writes nothing;
3. insert the usage markers, `ON CONFLICT DO NOTHING RETURNING`: only tasks never counted
   come back, and only they are added to `usage_daily`, in the same transaction.

Rows are sorted by key in every statement, so two writers never lock rows in opposite orders.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, literal_column
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.core.events import parse_event_id
from services.persistence.records import PersistRecord
from services.persistence.schema import messages, sessions, tasks, usage_daily, usage_events


@dataclass
class Written:
    """Rows each table gained (0 everywhere for a fully replayed batch)."""

    rows: dict[str, int] = field(default_factory=dict)

    def add(self, table: str, count: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + count

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def exact_cost(cost: float) -> Decimal:
    """The float of the JSON record as the decimal it was written as (0.1 stays 0.1), to
    its last digit: rounded, small costs were billed as less than clients were told."""
    return Decimal(repr(cost))


def event_key(record: PersistRecord) -> tuple[int, int]:
    """Where the task's messages sort in its session: its final event's log id as numbers.

    A record without an event id sorts at its completion time (a best effort for records of
    a worker that could not learn the id).
    """
    if record.final_event_id is not None:
        return parse_event_id(record.final_event_id)
    return int(record.completed_at.timestamp() * 1000), 0


def usage_day(record: PersistRecord) -> date:
    return record.completed_at.astimezone(UTC).date()


def _clean(value: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold NUL characters; replace them, keep the rest."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def message_rows(record: PersistRecord) -> list[dict[str, Any]]:
    event_ms, event_seq = event_key(record)
    common = {
        "tenant_id": record.tenant_id,
        "task_id": record.task_id,
        "session_id": record.session_id,
        "agent_id": record.agent_id,
        "user_id": _clean(record.user_id),
        "status": record.status,
        "final_event_id": record.final_event_id,
        "event_ms": event_ms,
        "event_seq": event_seq,
        "created_at": record.created_at,
        "completed_at": record.completed_at,
    }
    unmetered = {"input_tokens": None, "output_tokens": None, "cost": None, "model": None}
    rows = [
        {
            **common,
            **unmetered,
            "role": "user",
            "part": 0,
            "content": _clean(record.message),
            "first_chunk_at": None,
        }
    ]
    if record.status == "completed":
        usage = record.usage
        rows.append(
            {
                **common,
                "role": "assistant",
                "part": 1,
                "content": _clean(record.content or ""),
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cost": exact_cost(usage.cost),
                "model": _clean(usage.model),
                "first_chunk_at": record.first_chunk_at,
            }
        )
    return rows


def task_row(record: PersistRecord) -> dict[str, Any]:
    completed = record.status == "completed"
    return {
        "tenant_id": record.tenant_id,
        "task_id": record.task_id,
        "session_id": record.session_id,
        "agent_id": record.agent_id,
        "status": record.status,
        "attempt": record.attempt,
        "error": _clean(record.error),
        "result": {"content": _clean(record.content or ""), "role": "assistant"}
        if completed
        else None,
        "input_tokens": record.usage.input_tokens,
        "output_tokens": record.usage.output_tokens,
        "cost": exact_cost(record.usage.cost),
        "model": _clean(record.usage.model),
        "final_event_id": record.final_event_id,
        "created_at": record.created_at,
        "updated_at": record.completed_at,
    }


def usage_row(record: PersistRecord) -> dict[str, Any]:
    return {
        "tenant_id": record.tenant_id,
        "task_id": record.task_id,
        "day": usage_day(record),
        "input_tokens": record.usage.input_tokens,
        "output_tokens": record.usage.output_tokens,
        "cost": exact_cost(record.usage.cost),
    }


def unique_by_task(records: Iterable[PersistRecord]) -> list[PersistRecord]:
    """The first record of each task, sorted by (tenant, task): the lock order."""
    seen: dict[tuple[str, str], PersistRecord] = {}
    for record in records:
        seen.setdefault((record.tenant_id, record.task_id), record)
    return [seen[key] for key in sorted(seen)]


async def _upsert_sessions(
    conn: AsyncConnection, records: Sequence[PersistRecord]
) -> tuple[dict[tuple[str, str], datetime | None], int]:
    """First and last activity per session: each session's erasure time, and how many are new."""
    spans: dict[tuple[str, str], tuple[datetime, datetime]] = {}
    for record in records:
        key = (record.tenant_id, record.session_id)
        first, last = spans.get(key, (record.created_at, record.completed_at))
        spans[key] = (min(first, record.created_at), max(last, record.completed_at))
    rows = [
        {"tenant_id": t, "session_id": s, "created_at": first, "last_activity_at": last}
        for (t, s), (first, last) in sorted(spans.items())
    ]
    new = insert(sessions)
    stmt = new.on_conflict_do_update(
        index_elements=[sessions.c.tenant_id, sessions.c.session_id],
        set_={
            "created_at": func.least(sessions.c.created_at, new.excluded.created_at),
            "last_activity_at": func.greatest(
                sessions.c.last_activity_at, new.excluded.last_activity_at
            ),
        },
    ).returning(
        sessions.c.tenant_id,
        sessions.c.session_id,
        sessions.c.erased_at,
        literal_column("xmax = 0").label("created"),  # PostgreSQL: inserted, not updated
    )
    result = (await conn.execute(stmt, rows)).all()
    erased = {(row.tenant_id, row.session_id): row.erased_at for row in result}
    return erased, sum(1 for row in result if row.created)


def _not_erased(
    records: Sequence[PersistRecord], erased: dict[tuple[str, str], datetime | None]
) -> list[PersistRecord]:
    kept = []
    for record in records:
        erased_at = erased.get((record.tenant_id, record.session_id))
        if erased_at is None or record.created_at > erased_at:
            kept.append(record)
    return kept


async def _insert_new(conn: AsyncConnection, table: Any, rows: list[dict[str, Any]]) -> int:
    if not rows:
        return 0
    primary = list(table.primary_key.columns)
    stmt = insert(table).on_conflict_do_nothing(index_elements=primary).returning(primary[0])
    result = await conn.execute(stmt, rows)
    return len(result.all())


async def _add_usage(conn: AsyncConnection, records: Sequence[PersistRecord]) -> tuple[int, int]:
    """Markers for tasks never counted, and their usage added to the daily sums."""
    stmt = (
        insert(usage_events)
        .on_conflict_do_nothing(index_elements=[usage_events.c.tenant_id, usage_events.c.task_id])
        .returning(
            usage_events.c.tenant_id,
            usage_events.c.day,
            usage_events.c.input_tokens,
            usage_events.c.output_tokens,
            usage_events.c.cost,
        )
    )
    fresh = (await conn.execute(stmt, [usage_row(record) for record in records])).all()
    if not fresh:
        return 0, 0
    sums: dict[tuple[str, date], list[Any]] = {}
    for row in fresh:
        total = sums.setdefault((row.tenant_id, row.day), [0, 0, 0, Decimal(0)])
        total[0] += 1
        total[1] += row.input_tokens
        total[2] += row.output_tokens
        total[3] += row.cost
    daily = [
        {
            "tenant_id": tenant,
            "day": day,
            "requests": requests,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cost": cost,
        }
        for (tenant, day), (requests, input_tokens, output_tokens, cost) in sorted(sums.items())
    ]
    upsert = insert(usage_daily)
    upsert = upsert.on_conflict_do_update(
        index_elements=[usage_daily.c.tenant_id, usage_daily.c.day],
        set_={
            name: usage_daily.c[name] + upsert.excluded[name]
            for name in ("requests", "input_tokens", "output_tokens", "cost")
        },
    )
    await conn.execute(upsert, daily)
    return len(fresh), len(daily)


async def write_batch(conn: AsyncConnection, records: Sequence[PersistRecord]) -> Written:
    """Write `records` on `conn`; the caller owns the transaction (commit = all or nothing)."""
    written = Written()
    batch = unique_by_task(records)
    if not batch:
        return written
    erased, new_sessions = await _upsert_sessions(conn, batch)
    written.add("sessions", new_sessions)
    kept = _not_erased(batch, erased)
    rows = sorted(
        (row for record in kept for row in message_rows(record)),
        key=lambda row: (row["tenant_id"], row["task_id"], row["role"]),
    )
    written.add("messages", await _insert_new(conn, messages, rows))
    written.add("tasks", await _insert_new(conn, tasks, [task_row(record) for record in kept]))
    events, days = await _add_usage(conn, batch)
    written.add("usage_events", events)
    written.add("usage_daily", days)
    return written

"""`orchestrator prune` deletes history older than the retention, and only that."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core import keys
from services.core.settings import load_settings
from services.persistence.batch import write_batch
from services.persistence.cli import prune_command
from services.persistence.history import HistoryStore
from services.persistence.records import publish_record
from services.persistence.retention import prune
from services.persistence.schema import sessions
from tests.persistence.conftest import eventually, fast_settings, make_record
from tests.persistence.test_writer import drained, running

NOW = datetime(2026, 6, 1, tzinfo=UTC)


async def test_prune_deletes_rows_older_than_the_retention_only(engine: AsyncEngine) -> None:
    old, recent = NOW - timedelta(days=40), NOW - timedelta(days=2)
    records = [
        make_record("old1", session_id="old", created_at=old, event_id="1-0"),
        make_record("old2", session_id="old", created_at=old, status="failed", event_id="1-1"),
        make_record("new1", session_id="new", created_at=recent, event_id="2-0"),
        make_record("mixed-old", session_id="mixed", created_at=old, event_id="1-2"),
        make_record("mixed-new", session_id="mixed", created_at=recent, event_id="2-1"),
    ]
    async with engine.begin() as conn:
        await write_batch(conn, records)

    result = await prune(engine, 30, now=NOW)

    assert result.deleted == {"messages": 5, "tasks": 3, "usage_events": 3, "sessions": 1}
    history = HistoryStore(engine)
    assert not await history.session_exists("acme", "old")
    assert len((await history.messages("acme", "new")).messages) == 2
    mixed = await history.messages("acme", "mixed")
    assert [m.task_id for m in mixed.messages] == ["mixed-new", "mixed-new"]
    assert await history.task("acme", "old1") is None
    assert await history.task("acme", "new1") is not None
    usage = await history.usage("acme", date(2026, 1, 1), date(2026, 12, 31))
    assert sum(day.requests for day in usage) == 5  # daily sums are kept
    assert (await prune(engine, 30, now=NOW)).total == 0


def test_prune_command_prints_what_it_deleted(
    database_url: str, engine: AsyncEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load_settings(database_url=database_url, history_retention_days=30)
    assert prune_command(settings) == 0
    out = capsys.readouterr().out
    assert out.startswith("pruned history before ")
    assert "messages 0, tasks 0, usage_events 0, sessions 0" in out


async def test_an_erased_session_stays_erased_after_a_prune(engine: AsyncEngine) -> None:
    """Erasing a session idle beyond the retention keeps its tombstone through the next prune.

    A task created before the erasure whose record reaches the writer after that prune must
    still write nothing: the tombstone counts as the session's last activity.
    """
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await write_batch(conn, [make_record("old", created_at=now - timedelta(days=40))])
    history = HistoryStore(engine)
    assert await history.delete_session("acme", "s1") == 2

    assert (await prune(engine, 30)).deleted["sessions"] == 0

    late = make_record("late", created_at=now - timedelta(minutes=1), event_id="2-0")
    async with engine.begin() as conn:
        await write_batch(conn, [late])
    assert (await history.messages("acme", "s1")).messages == []
    assert await history.task("acme", "late") is None


async def test_a_session_active_while_prune_runs_is_kept(engine: AsyncEngine) -> None:
    """Prune picks rows by `ctid` and deletes them in one statement; a session the writer
    touches meanwhile is a new row version (another ctid) and survives.

    The writer's transaction holds the row while prune waits for it, then commits new
    activity: PostgreSQL re-checks the row prune waited for, and it no longer matches.
    """
    old = datetime.now(UTC) - timedelta(days=40)
    async with engine.begin() as conn:
        await write_batch(conn, [make_record("old", created_at=old)])
    writer = await engine.connect()
    try:
        transaction = await writer.begin()
        await writer.execute(
            update(sessions)
            .values(last_activity_at=func.now())
            .where(sessions.c.session_id == "s1")
        )
        pruning = asyncio.create_task(prune(engine, 30))

        async def prune_waits_for_the_row() -> bool:
            async with engine.connect() as conn:
                waiting = await conn.scalar(
                    text(
                        "select count(*) from pg_stat_activity"
                        " where wait_event_type = 'Lock' and query ilike 'delete from sessions%'"
                    )
                )
            return bool(waiting)

        await eventually(prune_waits_for_the_row)
        await transaction.commit()
        result = await pruning
    finally:
        await writer.close()
    assert result.deleted["sessions"] == 0
    assert result.deleted["messages"] == 2
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(sessions)) == 1


async def test_a_record_past_the_retention_is_neither_written_nor_counted_again(
    redis: Redis, redis_url: str, database_url: str, engine: AsyncEngine
) -> None:
    """Prune deletes the usage markers of days past the retention and keeps the daily sums: a
    record of such a day reaching the writer afterwards (a dead letter replayed, a backlog
    kept through a long outage) was counted a second time, and its history written again
    only for the next prune to delete it."""
    settings = fast_settings(redis_url, database_url, history_retention_days=30)
    now = datetime.now(UTC)
    old = make_record("old", created_at=now - timedelta(days=40), event_id="1-0")
    async with engine.begin() as conn:
        await write_batch(conn, [old])
    assert (await prune(engine, 30)).deleted["usage_events"] == 1
    recent = make_record("recent", created_at=now - timedelta(days=2), event_id="2-0")
    for record in (old, recent):
        await publish_record(redis, record)

    async with running(redis, settings, engine):
        await eventually(lambda: drained(redis), what="backlog drained")

    history = HistoryStore(engine)
    usage = await history.usage("acme", (now - timedelta(days=60)).date(), now.date())
    assert sum(day.requests for day in usage) == 2  # old once, recent once
    assert await history.task("acme", "old") is None
    assert await history.task("acme", "recent") is not None
    assert await redis.xlen(keys.DEAD_LETTERS) == 0


async def test_a_tombstone_of_the_boundary_day_outlives_prune_for_a_late_record(
    redis: Redis, redis_url: str, database_url: str, engine: AsyncEngine
) -> None:
    """A session erased on the retention's boundary day, before the time of day prune ran:
    prune cut at that moment and deleted the tombstone, while the writer accepts records of
    the whole day. The erased task's record, replayed then (a dead letter, a backlog kept
    through an outage), wrote the erased conversation back. Both count whole UTC days now."""
    now = datetime.now(UTC)
    cutoff = now - timedelta(days=30)
    day_start = cutoff.replace(hour=0, minute=0, second=0, microsecond=0)
    span = cutoff - day_start
    completed = day_start + span / 3
    erased_at = day_start + span * 2 / 3
    record = make_record(
        "secret", created_at=completed - timedelta(milliseconds=1), completed_at=completed,
        event_id="1-0",
    )  # fmt: skip
    async with engine.begin() as conn:
        await write_batch(conn, [record])
    history = HistoryStore(engine)
    assert await history.delete_session("acme", "s1") == 2
    # The erasure happened 30 days ago, at `erased_at` (on the boundary day).
    async with engine.begin() as conn:
        await conn.execute(
            update(sessions)
            .where(sessions.c.session_id == "s1")
            .values(erased_at=erased_at, last_activity_at=erased_at)
        )
    await prune(engine, 30)

    # The erased task's record comes back to the writer (a dead letter replayed).
    await publish_record(redis, record)
    settings = fast_settings(redis_url, database_url, history_retention_days=30)
    async with running(redis, settings, engine):
        await eventually(lambda: drained(redis), what="backlog drained")

    page = await history.messages("acme", "s1")
    assert [m.content for m in page.messages] == [], "erased conversation written back"
    assert await history.task("acme", "secret") is None

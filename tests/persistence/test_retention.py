"""`orchestrator prune` deletes history older than the retention, and only that."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.settings import load_settings
from services.persistence.batch import write_batch
from services.persistence.cli import prune_command
from services.persistence.history import HistoryStore
from services.persistence.retention import prune
from tests.persistence.conftest import make_record

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

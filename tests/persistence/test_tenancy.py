"""Tenant A cannot read, list or delete tenant B's history or usage."""

from __future__ import annotations

from datetime import date

from sqlalchemy.ext.asyncio import AsyncEngine

from services.persistence.batch import write_batch
from services.persistence.history import HistoryStore
from tests.persistence.conftest import make_record


async def test_another_tenants_session_task_and_usage_do_not_exist_for_the_caller(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        await write_batch(
            conn, [make_record(f"b{i}", tenant_id="tenant-b", event_id=f"1-{i}") for i in range(3)]
        )
    history = HistoryStore(engine)

    assert (await history.messages("tenant-a", "s1", limit=50)).messages == []
    assert (await history.messages("tenant-a", "s1", after_event_id="0-0")).messages == []
    assert not await history.session_exists("tenant-a", "s1")
    assert await history.task("tenant-a", "b0") is None
    assert await history.usage("tenant-a", date(2026, 1, 1), date(2026, 12, 31)) == []

    assert await history.delete_session("tenant-a", "s1") == 0
    assert len((await history.messages("tenant-b", "s1", limit=50)).messages) == 6
    assert await history.task("tenant-b", "b0") is not None


async def test_a_cursor_from_another_tenant_reads_only_the_callers_own_rows(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        await write_batch(
            conn, [make_record(f"b{i}", tenant_id="tenant-b", event_id=f"1-{i}") for i in range(3)]
        )
    history = HistoryStore(engine)
    page = await history.messages("tenant-b", "s1", limit=2)
    assert page.next_cursor is not None
    stolen = await history.messages("tenant-a", "s1", limit=2, cursor=page.next_cursor)
    assert stolen.messages == []

"""The writer against a real PostgreSQL and Redis: records the contract accepts are written."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.actions import MAX_COST
from services.core.deadletters import list_dead_letters
from services.core.settings import Settings
from services.persistence.records import publish_record
from services.persistence.schema import messages, tasks
from services.persistence.writer import PersistenceWriter, backlog
from tests.persistence.conftest import eventually, make_record


@contextlib.asynccontextmanager
async def running(redis: Redis, settings: Settings, engine: AsyncEngine) -> AsyncIterator[None]:
    writer = PersistenceWriter(redis, settings, engine=engine, consumer="limits")
    task = asyncio.create_task(writer.run())
    try:
        yield
    finally:
        writer.stop()
        await asyncio.wait_for(task, 10)


async def count(engine: AsyncEngine, table: object) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)  # type: ignore[arg-type]


async def test_tasks_at_the_contracts_largest_cost_are_all_written(
    redis: Redis, settings: Settings, engine: AsyncEngine
) -> None:
    """The contract accepts a cost up to 10^9 per task (README, "For AES teams"). A tenant's
    101st such task of a UTC day overflows `usage_daily.cost` (NUMERIC(20, 9): < 10^11);
    the writer then takes the whole record for bad data and dead-letters it: the task's
    question, answer and final state never reach history."""
    records = [make_record(f"big{i:03}", cost=MAX_COST, event_id=f"7-{i}") for i in range(101)]
    for record in records:
        await publish_record(redis, record)
    async with running(redis, settings, engine):
        await eventually(lambda: _drained(redis), what="backlog drained")
    letters = await list_dead_letters(redis)
    assert [letter.reason[:200] for letter in letters] == []
    assert await count(engine, tasks) == 101
    assert await count(engine, messages) == 202


async def _drained(redis: Redis) -> bool:
    return await backlog(redis) == 0


async def test_a_task_of_a_user_whose_id_holds_a_nul_is_written(
    redis: Redis, settings: Settings, engine: AsyncEngine
) -> None:
    """`user_id` is the token's `sub`, any string (services/core/auth.py). The writer replaces
    NUL characters in every free text it writes (PostgreSQL text cannot hold them) except
    `user_id`: such a user's tasks are refused as bad data and dead-lettered, history lost."""
    record = make_record("nul-user")
    record.user_id = "alice\x00admin"
    await publish_record(redis, record)
    async with running(redis, settings, engine):
        await eventually(lambda: _drained(redis), what="backlog drained")
    letters = await list_dead_letters(redis)
    assert [letter.reason[:200] for letter in letters] == []
    assert await count(engine, tasks) == 1

"""The writer drains the record stream into PostgreSQL in batches, once per task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core import keys
from services.core.deadletters import list_dead_letters
from services.core.settings import Settings
from services.persistence.batch import write_batch
from services.persistence.records import PersistRecord, encode_record, publish_record
from services.persistence.schema import messages, tasks, usage_daily, usage_events
from services.persistence.writer import PersistenceWriter, backlog
from tests.persistence.conftest import eventually, make_record


@contextlib.asynccontextmanager
async def running(
    redis: Redis, settings: Settings, engine: AsyncEngine, consumer: str = "w1"
) -> AsyncIterator[PersistenceWriter]:
    writer = PersistenceWriter(redis, settings, engine=engine, consumer=consumer)
    task = asyncio.create_task(writer.run())
    try:
        yield writer
    finally:
        writer.stop()
        await asyncio.wait_for(task, 10)


async def count(engine: AsyncEngine, table: object) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)  # type: ignore[arg-type]


async def daily(engine: AsyncEngine, tenant_id: str = "acme") -> tuple[int, int, int, Decimal]:
    query = select(
        func.sum(usage_daily.c.requests),
        func.sum(usage_daily.c.input_tokens),
        func.sum(usage_daily.c.output_tokens),
        func.sum(usage_daily.c.cost),
    ).where(usage_daily.c.tenant_id == tenant_id)
    async with engine.connect() as conn:
        row = (await conn.execute(query)).one()
    return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0), row[3] or Decimal(0)


async def drained(redis: Redis) -> bool:
    return await backlog(redis) == 0


def mixed_records(n: int) -> list[PersistRecord]:
    return [
        make_record(
            f"task{i}",
            session_id=f"s{i % 3}",
            status="failed" if i % 5 == 4 else "completed",
            event_id=f"1000-{i}",
        )
        for i in range(n)
    ]


async def test_records_on_the_stream_are_written_in_batches_and_removed(
    redis: Redis, settings: Settings, engine: AsyncEngine
) -> None:
    records = mixed_records(25)
    for record in records:
        await publish_record(redis, record)
    assert await backlog(redis) == 25
    async with running(redis, settings, engine) as writer:
        await eventually(lambda: drained(redis), what="backlog drained")
    assert await count(engine, tasks) == 25
    completed = sum(1 for record in records if record.status == "completed")
    assert await count(engine, messages) == 25 + completed
    assert writer.batches == 3  # batch size 10
    assert await redis.xlen(keys.PERSIST_RECORDS) == 0
    assert await daily(engine) == (25, 10 * completed, 5 * completed, Decimal("0.1") * completed)


async def test_a_replayed_batch_writes_nothing_twice_and_usage_adds_up_exactly(
    engine: AsyncEngine,
) -> None:
    records = [make_record(f"t{i}", cost=0.1, event_id=f"5-{i}") for i in range(10)]
    async with engine.begin() as conn:
        first = await write_batch(conn, records)
    async with engine.begin() as conn:
        again = await write_batch(conn, records + records)
    assert first.rows["messages"] == 20
    assert again.total == 0
    assert await count(engine, messages) == 20
    assert await count(engine, usage_events) == 10
    assert await daily(engine) == (10, 100, 50, Decimal("1.0"))


async def test_a_task_published_twice_is_written_once(
    redis: Redis, settings: Settings, engine: AsyncEngine
) -> None:
    records = mixed_records(12)
    async with redis.pipeline(transaction=False) as pipe:
        for record in records + records:
            await publish_record(pipe, record)
        await pipe.execute()
    async with running(redis, settings, engine):
        await eventually(lambda: drained(redis), what="backlog drained")
    assert await count(engine, tasks) == 12
    completed = sum(1 for record in records if record.status == "completed")
    assert await daily(engine) == (12, 10 * completed, 5 * completed, Decimal("0.1") * completed)


async def test_writers_sharing_the_stream_count_each_task_once(
    redis: Redis, settings: Settings, engine: AsyncEngine
) -> None:
    records = [make_record(f"t{i}", event_id=f"9-{i}", cost=0.3) for i in range(60)]
    async with redis.pipeline(transaction=False) as pipe:
        for record in records + records[::-1]:
            await publish_record(pipe, record)
        await pipe.execute()
    async with (
        running(redis, settings, engine, "w1"),
        running(redis, settings, engine, "w2"),
        running(redis, settings, engine, "w3"),
    ):
        await eventually(lambda: drained(redis), what="backlog drained")
    assert await count(engine, tasks) == 60
    assert await daily(engine) == (60, 600, 300, Decimal("18.0"))


def dead_letters_counted() -> float:
    return REGISTRY.get_sample_value("orchestrator_dead_letters_total") or 0.0


async def test_malformed_records_are_dead_lettered_and_the_rest_are_written(
    redis: Redis, settings: Settings, engine: AsyncEngine
) -> None:
    good = make_record("good")
    bad_type = encode_record(good).replace(b'"attempt":1', b'"attempt":"1"')
    await redis.xadd(keys.PERSIST_RECORDS, {"action": b"not json"})
    await redis.xadd(keys.PERSIST_RECORDS, {"action": bad_type})
    await redis.xadd(keys.PERSIST_RECORDS, {"other": b"x"})
    await publish_record(redis, good)
    counted = dead_letters_counted()
    async with running(redis, settings, engine):
        await eventually(lambda: drained(redis), what="backlog drained")
    assert await count(engine, tasks) == 1
    assert dead_letters_counted() == counted + 3  # the alert's metric, as for the worker's
    letters = await list_dead_letters(redis)
    reasons = sorted(letter.reason.split(":")[0] for letter in letters)
    assert reasons == ["malformed record", "malformed record", "stream entry has no 'action' field"]
    assert {letter.stream for letter in letters} == {keys.PERSIST_RECORDS}


@pytest.mark.parametrize(
    "poison",
    [
        # a stream id, beyond PostgreSQL's bigint: SQLSTATE 22003
        make_record("bigint", event_id=f"{2**63}-0"),
        # decodes, but is no stream id (beyond 64 bits): refused before any SQL
        make_record("id", event_id="99999999999999999999-0"),
    ],
    ids=["refused by PostgreSQL", "not convertible to a row"],
)
async def test_a_record_that_cannot_be_written_is_dead_lettered_alone(
    redis: Redis, settings: Settings, engine: AsyncEngine, poison: PersistRecord
) -> None:
    """Not retried as an outage: that held the writer on the batch for ever."""
    batch = [make_record(f"ok{i}") for i in range(4)]
    for record in [*batch[:2], poison, *batch[2:]]:
        await publish_record(redis, record)
    async with running(redis, settings, engine):
        await eventually(lambda: drained(redis), what="backlog drained")
    assert await count(engine, tasks) == 4
    [letter] = await list_dead_letters(redis)
    assert letter.reason.startswith("refused by the database")
    # Not awaited by its session's history reads any more (they waited 2 s, said `pending`).
    unwritten = keys.session_unwritten(poison.tenant_id, poison.session_id)
    assert await redis.zscore(unwritten, poison.task_id) is None


@pytest.mark.parametrize("status", ["failed", "cancelled", "timed_out"])
async def test_a_task_that_did_not_complete_keeps_its_question_and_its_error(
    engine: AsyncEngine, status: str
) -> None:
    async with engine.begin() as conn:
        await write_batch(conn, [make_record("t1", status=status, event_id="1-1")])
    async with engine.connect() as conn:
        rows = (await conn.execute(select(messages.c.role, messages.c.status))).all()
        error = await conn.scalar(select(tasks.c.error))
    assert [tuple(row) for row in rows] == [("user", status)]
    assert error == {"code": status, "message": status}
    assert await daily(engine) == (1, 0, 0, Decimal(0))


async def test_a_writer_that_stops_leaves_the_group(
    redis: Redis, settings: Settings, engine: AsyncEngine
) -> None:
    """A writer is named after its pod: a group that kept every stopped one grew by one
    consumer per pod that ever lived."""
    await publish_record(redis, make_record("t1", event_id="1-0"))
    async with running(redis, settings, engine, "w1"):
        await eventually(lambda: drained(redis), what="backlog drained")
        consumers = await redis.xinfo_consumers(keys.PERSIST_RECORDS, keys.PERSIST_GROUP)
        assert [c["name"] for c in consumers] == [b"w1"]
    assert await redis.xinfo_consumers(keys.PERSIST_RECORDS, keys.PERSIST_GROUP) == []

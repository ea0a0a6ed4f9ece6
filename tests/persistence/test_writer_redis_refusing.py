"""The persistence writer when Redis refuses writes for a while (a demoted primary, or out of
memory): the worker rides these out (REDIS_REFUSING); the writer must too, or history stops
for the life of the worker process while chats go on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.cli.embedded import RedisServer
from services.core import keys
from services.core.redis_client import create_redis
from services.persistence.records import publish_record
from services.persistence.schema import tasks
from services.persistence.writer import PersistenceWriter
from tests.persistence.conftest import eventually, fast_settings, make_record


@pytest.fixture
def two_redis() -> Iterator[tuple[RedisServer, RedisServer]]:
    primary, other = RedisServer().start(), RedisServer().start()
    try:
        yield primary, other
    finally:
        other.cleanup()
        primary.cleanup()


@pytest.fixture
async def admin(two_redis: tuple[RedisServer, RedisServer]) -> AsyncIterator[Redis]:
    client = Redis.from_url(two_redis[0].url)
    yield client
    await client.aclose()


async def written(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(tasks)) or 0)


async def test_the_writer_survives_a_primary_demoted_and_promoted_again(
    two_redis: tuple[RedisServer, RedisServer],
    admin: Redis,
    database_url: str,
    engine: AsyncEngine,
) -> None:
    primary, other = two_redis
    settings = fast_settings(primary.url, database_url)
    redis = create_redis(settings)
    writer = PersistenceWriter(redis, settings, engine=engine, consumer="w1")
    running = asyncio.create_task(writer.run())
    try:
        await publish_record(admin, make_record("before", event_id="1-0"))
        await eventually(lambda: _is(written(engine), 1), what="first record written")

        # A failover demotes the primary (it now answers READONLY), then it is promoted again.
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(other.port))
        await eventually(lambda: _demoted(admin), timeout=10, what="primary demoted to a replica")
        await asyncio.sleep(0.3)  # several of the writer's 50 ms blocking reads
        await admin.execute_command("REPLICAOF", "NO", "ONE")

        await publish_record(admin, make_record("after", event_id="2-0"))
        caught_up = await _within(10, lambda: _is(written(engine), 2))
        assert caught_up, f"record not written after the failover; writer task: {running!r}"
    finally:
        writer.stop()
        done, _ = await asyncio.wait({running}, timeout=10)
        await redis.aclose()
    assert running in done
    assert running.exception() is None, repr(running.exception())


async def _within(seconds: float, check: Callable[[], Awaitable[bool]]) -> bool:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _is(value: object, expected: int) -> bool:
    return await value == expected  # type: ignore[misc]


async def _demoted(admin: Redis) -> bool:
    info = await admin.info("replication")
    return bool(info.get("role") == "slave")


async def test_the_writer_survives_redis_out_of_memory_while_dead_lettering(
    redis: Redis, settings: object, engine: AsyncEngine
) -> None:
    """A malformed record is dead-lettered with XADD, which Redis refuses at `maxmemory`
    (noeviction); once memory is freed the writer must go on writing."""
    await redis.xadd(keys.PERSIST_RECORDS, {"action": b"not json"})
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")
    writer = PersistenceWriter(redis, settings, engine=engine, consumer="w1")  # type: ignore[arg-type]
    running = asyncio.create_task(writer.run())
    try:
        await asyncio.sleep(0.5)  # the writer meets the refusal
        await redis.config_set("maxmemory", "0")
        await publish_record(redis, make_record("after", event_id="2-0"))
        caught_up = await _within(10, lambda: _is(written(engine), 1))
        assert caught_up, f"record not written after memory was freed; writer task: {running!r}"
    finally:
        await redis.config_set("maxmemory", "0")
        writer.stop()
        await asyncio.wait({running}, timeout=10)
    assert running.exception() is None, repr(running.exception())

"""PostgreSQL going away costs nothing: the backlog waits in Redis and is written once after."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from decimal import Decimal

import asyncpg
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.cli.embedded_postgres import PostgresServer
from services.persistence.database import async_engine, create_engine
from services.persistence.migrate import migrate
from services.persistence.records import publish_record
from services.persistence.schema import messages, tasks, usage_events
from services.persistence.writer import PersistenceWriter, backlog
from tests.persistence.conftest import eventually, fast_settings, fresh_database, make_record
from tests.persistence.test_writer import count, daily


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server this test may stop and start again (same directory, same port)."""
    server = PostgresServer(durable=False).start()
    yield server
    server.cleanup()


def backlog_metric() -> float | None:
    return REGISTRY.get_sample_value("orchestrator_persistence_backlog")


async def test_postgres_stopped_mid_run_loses_nothing_and_writes_each_task_once(
    redis: Redis, redis_url: str, own_server: PostgresServer
) -> None:
    url = own_server.url()
    await migrate(url)
    settings = fast_settings(redis_url, url, database_connect_timeout_seconds=1.0)
    writer = PersistenceWriter(redis, settings, engine=create_engine(settings), consumer="w1")
    running = asyncio.create_task(writer.run())
    try:
        for i in range(10):
            await publish_record(redis, make_record(f"before{i}", event_id=f"1-{i}"))
        await eventually(lambda: _is(backlog(redis), 0), what="first records written")

        await asyncio.to_thread(own_server.stop)
        for i in range(25):
            await publish_record(redis, make_record(f"during{i}", event_id=f"2-{i}"))
        await eventually(lambda: _true(writer.database_down), what="writer notices the outage")
        assert await backlog(redis) == 25
        await eventually(lambda: _true(backlog_metric() == 25), what="the gauge shows it")
        assert not running.done()

        await asyncio.to_thread(own_server.start)
        await eventually(lambda: _is(backlog(redis), 0), what="backlog written after restart")
        await eventually(lambda: _true(backlog_metric() == 0), what="the gauge shows it")
        assert not writer.database_down
    finally:
        writer.stop()
        await asyncio.wait_for(running, 10)
        await writer.engine.dispose()

    engine = async_engine(url)
    try:
        assert await count(engine, tasks) == 35
        assert await count(engine, messages) == 70
        assert await count(engine, usage_events) == 35
        assert await daily(engine) == (35, 350, 175, Decimal("3.5"))
    finally:
        await engine.dispose()


async def _is(value: object, expected: int) -> bool:
    return await value == expected  # type: ignore[misc]


async def _true(condition: bool) -> bool:
    return condition


async def test_a_failed_write_logs_no_message_body(
    redis: Redis,
    redis_url: str,
    postgres_server: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A statement error's text carried its parameters (the rows: questions and answers)
    into the writer's warning; the engine hides them (README: bodies are never logged)."""
    url = await fresh_database(postgres_server)
    await migrate(url)
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres_server.url())
    await admin.execute(f"ALTER DATABASE \"{name}\" SET lock_timeout = '300ms'")
    await admin.close()
    holder = await asyncpg.connect(url)  # a migration, say, holding the table
    lock = holder.transaction()
    await lock.start()
    await holder.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
    record = make_record("private")
    record.message = "a private question"
    await publish_record(redis, record)
    writer = PersistenceWriter(redis, fast_settings(redis_url, url), consumer="w1")
    failed = write_failures_counted()

    async def failed_once() -> bool:
        return write_failures_counted() > failed

    running = asyncio.create_task(writer.run())
    try:
        with caplog.at_level(logging.WARNING, logger="services.persistence.writer"):
            await eventually(failed_once, what="a write failing on the lock")
            await lock.rollback()
            await eventually(lambda: backlog_drained(redis), what="written after the lock")
    finally:
        await holder.close()
        writer.stop()
        await asyncio.wait_for(running, 10)
        await writer.engine.dispose()
    assert "database unavailable" in caplog.text
    assert "private question" not in caplog.text
    assert "answer private" not in caplog.text


def write_failures_counted() -> float:
    return REGISTRY.get_sample_value("orchestrator_persistence_write_failures_total") or 0.0


async def backlog_drained(redis: Redis) -> bool:
    return await backlog(redis) == 0

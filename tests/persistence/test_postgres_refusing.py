"""History requests while PostgreSQL refuses new connections (a restart under way, or its
connection limit reached): README promises 503 `unavailable` naming PostgreSQL, "retry"."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_servers() -> Iterator[tuple[RedisServer, PostgresServer]]:
    redis = RedisServer().start()
    database = PostgresServer(durable=False).start()
    try:
        yield redis, database
    finally:
        database.cleanup()
        redis.cleanup()


async def _refusing_new_connections(url: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = await asyncpg.connect(url, timeout=2)
        except asyncpg.exceptions.CannotConnectNowError:
            return
        await conn.close()
        assert time.monotonic() < deadline, "postgres kept accepting connections"
        await asyncio.sleep(0.02)


async def test_history_while_postgres_is_shutting_down_is_a_503(
    own_servers: tuple[RedisServer, PostgresServer], tmp_path_factory: pytest.TempPathFactory
) -> None:
    redis, database = own_servers
    await migrate(database.url())
    stack = new_stack(redis, tmp_path_factory.mktemp("logs"), database_url=database.url())
    session_holder = None
    try:
        api = stack.start_api()
        stack.wait_ready(api)
        # A smart shutdown (what a restart starts with while a session is open): PostgreSQL
        # answers new connections "the database system is shutting down" (SQLSTATE 57P03).
        session_holder = await asyncpg.connect(database.url())
        assert database.process is not None
        database.process.send_signal(signal.SIGTERM)
        await _refusing_new_connections(database.url())
        tenant = unique("t")
        async with httpx.AsyncClient(base_url=api.url, timeout=15) as http:
            messages = await http.get(
                "/api/sessions/s1/messages", params={"limit": 5}, headers=auth(tenant)
            )
            usage = await http.get("/api/usage", headers=auth(tenant))
            status = await http.get("/api/chat/tasks/unknownTask1", headers=auth(tenant))
        for reply in (messages, usage, status):
            assert reply.status_code == 503, (reply.request.url.path, reply.text)
            assert reply.json()["error"]["code"] == "unavailable"
    finally:
        if session_holder is not None:
            await session_holder.close()
        stack.stop()

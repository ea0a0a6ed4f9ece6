"""`/health/detailed` tells a pod whose database connections are all taken from a database
that is down (real api, Redis and PostgreSQL; a table lock holds the pod's one connection)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import lone_api

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def busy_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(durable=False).start()
    asyncio.run(migrate(server.url()))
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def api(
    own_redis: RedisServer, busy_postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    with lone_api(
        own_redis,
        tmp_path_factory.mktemp("logs"),
        database_url=busy_postgres.url(),
        database_pool_size="1",
        database_connect_timeout_seconds="5",
    ) as child:
        yield child


async def detailed_database(http: httpx.AsyncClient) -> dict[str, Any]:
    reply = await http.get("/health/detailed")
    return dict(reply.json()["components"]["database"])


async def test_a_pool_held_by_a_slow_read_is_busy_not_down(
    api: Child, busy_postgres: PostgresServer
) -> None:
    """A history read waits on a locked table and holds the pod's only connection. The ping
    of `/health/detailed` waited the connect timeout (5 s) for that pool, then reported the
    database `down`: an SRE read an outage into a database that answered. It says `busy` at
    once, with the pool's figures."""
    tenant = unique("t")
    blocker = await asyncpg.connect(busy_postgres.url())
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        assert await detailed_database(http) == {"status": "up", "pool": {"in_use": 0, "size": 1}}
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        read = asyncio.create_task(
            http.get(f"/api/sessions/{unique('s')}/messages", headers=auth(tenant))
        )
        try:
            async with asyncio.timeout(10):  # the read's query reaching the lock: no event
                while (state := await detailed_database(http))["status"] != "busy":
                    assert state["status"] == "up", state
                    await asyncio.sleep(0.05)
            assert state == {"status": "busy", "pool": {"in_use": 1, "size": 1}}
            assert not read.done()
        finally:
            await lock.rollback()
            await blocker.close()
        assert (await read).status_code == 404  # the read goes on once the lock is gone
        assert (await detailed_database(http))["status"] == "up"

"""A session's set of records on their way (`{s:T:S}:unwritten`) once the persistence stream
was trimmed (PERSIST_STREAM_MAXLEN while PostgreSQL was away): real Valkey, real PostgreSQL,
the real persistence writer and a real uvicorn api."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.core import keys
from services.persistence.migrate import migrate
from services.persistence.records import publish_record
from services.persistence.writer import PersistenceWriter
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import lone_api
from tests.persistence.conftest import fast_settings, make_record

pytestmark = pytest.mark.e2e

MAXLEN = 1000  # the smallest PERSIST_STREAM_MAXLEN the settings accept
ENDED = 1500  # tasks that ended while PostgreSQL was away: more than MAXLEN


@pytest.fixture(scope="module")
def database() -> Iterator[PostgresServer]:
    server = PostgresServer(durable=False).start()
    try:
        asyncio.run(migrate(server.url()))
        yield server
    finally:
        server.cleanup()


async def test_a_trimmed_record_does_not_keep_every_history_read_waiting(
    redis: Redis, redis_server: RedisServer, database: PostgresServer, tmp_path: Path
) -> None:
    """README: a page read waits up to 2 s for the session's records on their way; `pending`
    says how many are still on their way ("ask again"). A record trimmed from the stream
    (PERSIST_STREAM_MAXLEN, README: history traded for memory) is never on its way again, yet
    its task stays in the set: once the writer has drained everything there is, every read of
    the session still waits the full 2 s and answers `pending: N` (ask again: for ever), and
    the set lives an hour after the session's last ended task (renewed by each)."""
    tenant, session = unique("t"), unique("s")
    now = datetime.now(UTC)
    for i in range(ENDED):  # each task's record, as the worker publishes it when it ends
        record = make_record(f"task-{i:05d}", tenant_id=tenant, session_id=session, created_at=now)
        await publish_record(redis, record, maxlen=MAXLEN)
    assert await redis.xlen(keys.PERSIST_RECORDS) < ENDED  # some were trimmed

    # PostgreSQL is back: the writer drains the stream.
    settings = fast_settings(redis_server.url, database.url())
    writer = PersistenceWriter(redis, settings, consumer="hunt-w1")
    running = asyncio.create_task(writer.run())
    try:
        async with asyncio.timeout(40):
            while await redis.xlen(keys.PERSIST_RECORDS):
                await asyncio.sleep(0.05)
    finally:
        writer.stop()
        await running

    with lone_api(redis_server, tmp_path / "logs", database_url=database.url()) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            deadline = time.monotonic() + 20
            while True:  # within the publish window a trimmed record may still be coming
                started = time.monotonic()
                reply = await http.get(
                    f"/api/sessions/{session}/messages", params={"limit": 10}, headers=auth(tenant)
                )
                took = time.monotonic() - started
                assert reply.status_code == 200, reply.text
                if reply.json()["pending"] == 0 or time.monotonic() > deadline:
                    break
            # The read that first answered 0 may have waited while the window ran out (a
            # loaded machine: 1.9 s); the one after it has nothing to wait for.
            started = time.monotonic()
            reply = await http.get(
                f"/api/sessions/{session}/messages", params={"limit": 10}, headers=auth(tenant)
            )
            took = time.monotonic() - started
    left = await redis.zcard(keys.session_unwritten(tenant, session))
    assert (reply.json()["pending"], took < 1.5, left) == (0, True, 0), (
        f"nothing left to write (stream empty), yet the read took {took:.1f} s and answered "
        f"pending={reply.json()['pending']} ({left} trimmed tasks kept)"
    )

"""The persistence writer fails in a way it does not foresee: the worker starts it again, so
history is written once the cause is gone, without a restart of the pod."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.core import keys
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, deploy
from tests.e2e.test_log_volume import log_lines

pytestmark = pytest.mark.e2e


@pytest.fixture
def persisted(own_redis: RedisServer, tmp_path: Path) -> Iterator[Deployment]:
    postgres = PostgresServer(durable=False).start()
    try:
        asyncio.run(migrate(postgres.url()))
        with deploy(
            own_redis, tmp_path / "logs", database_url=postgres.url(), **FAST_EXECUTOR
        ) as deployed:
            yield deployed
    finally:
        postgres.cleanup()


async def test_a_writer_that_failed_is_started_again(
    persisted: Deployment, own_redis: RedisServer
) -> None:
    """Its stream's key holding another type (WRONGTYPE, which no retry of the writer's
    covers) ended the writer's task, which nobody awaited: history stopped for good."""
    api = persisted.api
    worker = next(child for child in persisted.stack.children if child.role == "worker")
    redis = Redis.from_url(own_redis.url)
    try:
        await redis.delete(keys.PERSIST_RECORDS)
        await redis.set(keys.PERSIST_RECORDS, "not a stream")
        deadline = time.monotonic() + 30
        while not [line for line in log_lines(worker) if "persistence writer failed" in line]:
            assert time.monotonic() < deadline, "the writer never met the bad key"
            await asyncio.sleep(0.05)
        await redis.delete(keys.PERSIST_RECORDS)
    finally:
        await redis.aclose()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient(timeout=10) as http:
        task_id = await send(http, api.url, tenant, {"message": "keep", "session_id": session})
        task_id = task_id.json()["task_id"]
        await events_until(ws, final_of(task_id))
        await ws.close()
        deadline = time.monotonic() + 45  # restarts back off: 1, 2, 4... s
        while True:
            page = await http.get(
                f"{api.url}/api/sessions/{session}/messages", headers=auth(tenant)
            )
            if [m for m in page.json()["messages"] if m["task_id"] == task_id]:
                break
            assert time.monotonic() < deadline, "history was never written again"
            await asyncio.sleep(0.1)

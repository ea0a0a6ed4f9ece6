"""PostgreSQL down and back: the sidebar list and an erasure (real processes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.core import keys
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, deploy

pytestmark = pytest.mark.e2e


async def final(http: httpx.AsyncClient, url: str, tenant: str, task_id: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        body = (await http.get(f"{url}/api/chat/tasks/{task_id}", headers=auth(tenant))).json()
        if body.get("status") in ("completed", "failed", "cancelled", "timed_out"):
            return
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


async def listed(http: httpx.AsyncClient, url: str, tenant: str, want: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        reply = await http.get(f"{url}/api/sessions", headers=auth(tenant))
        if reply.status_code == 200:
            sessions: list[dict[str, Any]] = reply.json()["sessions"]
            if sum(s["messages"] for s in sessions) >= want:
                return sessions
        assert time.monotonic() < deadline, reply.text
        await asyncio.sleep(0.1)


async def test_while_postgres_is_down_list_and_erase_are_503_and_erase_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With PostgreSQL down: GET /api/sessions and DELETE /api/sessions/{id} answer 503
    `unavailable` and the DELETE erases nothing of Redis (no half erasure); chats go on. Once
    it is back the list shows every message once, and the erasure then works."""
    redis = RedisServer().start()
    database = PostgresServer(durable=False).start()
    await migrate(database.url())
    logs = tmp_path_factory.mktemp("logs")
    try:
        with deploy(redis, logs, database_url=database.url(), **FAST_EXECUTOR) as deployed:
            api = deployed.api
            tenant, session = unique("t"), unique("s")
            async with httpx.AsyncClient(timeout=15) as http:
                reply = await send(
                    http, api.url, tenant, {"message": "before", "session_id": session}
                )
                await final(http, api.url, tenant, reply.json()["task_id"])
                await listed(http, api.url, tenant, 1)
                database.stop()
                tasks = []
                for n in range(3):
                    reply = await send(
                        http, api.url, tenant, {"message": f"down {n}", "session_id": session}
                    )
                    assert reply.status_code == 202, reply.text
                    tasks.append(reply.json()["task_id"])
                    await final(http, api.url, tenant, tasks[-1])
                sessions = await http.get(f"{api.url}/api/sessions", headers=auth(tenant))
                erase = await http.delete(f"{api.url}/api/sessions/{session}", headers=auth(tenant))
                log_left = await redis_client_len(redis.url, keys.session_log(tenant, session))
                task_after = await http.get(
                    f"{api.url}/api/chat/tasks/{tasks[0]}", headers=auth(tenant)
                )
                assert sessions.status_code == 503, sessions.text
                assert sessions.json()["error"]["code"] == "unavailable"
                assert erase.status_code == 503, erase.text
                assert erase.json()["error"]["code"] == "unavailable"
                assert log_left > 0
                assert task_after.status_code == 200, task_after.text
                database.start()
                found = await listed(http, api.url, tenant, 4)
                assert [(s["session_id"], s["messages"], s["title"]) for s in found] == [
                    (session, 4, "before")
                ], found
                erase = await http.delete(f"{api.url}/api/sessions/{session}", headers=auth(tenant))
                assert erase.status_code == 200, erase.text
                assert erase.json()["deleted_messages"] == 8, erase.text
                empty = (await http.get(f"{api.url}/api/sessions", headers=auth(tenant))).json()
                assert empty["sessions"] == [], empty
    finally:
        database.cleanup()
        redis.cleanup()


async def redis_client_len(url: str, key: str) -> int:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        return int(await client.xlen(key))
    finally:
        await client.aclose()

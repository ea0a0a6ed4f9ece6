"""History over HTTP on real processes (uvicorn api, worker, executor, Redis, PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.core import keys
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, deploy

pytestmark = pytest.mark.e2e

PAGE_MAX = 10  # a valid ORCHESTRATOR_HISTORY_PAGE_MAX (1..1000), below the default page of 50


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[RedisServer, PostgresServer]]:
    redis = RedisServer().start()
    database = PostgresServer(durable=False).start()
    try:
        asyncio.run(migrate(database.url()))
        yield redis, database
    finally:
        database.cleanup()
        redis.cleanup()


@pytest.fixture(scope="module")
def stack(
    servers: tuple[RedisServer, PostgresServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    redis, database = servers
    with deploy(
        redis,
        tmp_path_factory.mktemp("logs"),
        database_url=database.url(),
        history_page_max=str(PAGE_MAX),
        **FAST_EXECUTOR,
    ) as deployed:
        yield deployed


async def finished(http: httpx.AsyncClient, tenant: str, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        reply = await http.get(f"/api/chat/tasks/{task_id}", headers=auth(tenant))
        body: dict[str, Any] = reply.json()
        if body.get("status") in ("completed", "failed", "cancelled", "timed_out"):
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


async def persisted(
    http: httpx.AsyncClient, tenant: str, session: str, expect: int
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        reply = await http.get(
            f"/api/sessions/{session}/messages", params={"limit": PAGE_MAX}, headers=auth(tenant)
        )
        if reply.status_code == 200 and len(reply.json()["messages"]) >= expect:
            found: list[dict[str, Any]] = reply.json()["messages"]
            return found
        assert time.monotonic() < deadline, reply.text
        await asyncio.sleep(0.05)


async def chat(http: httpx.AsyncClient, stack: Deployment, tenant: str, session: str) -> str:
    reply = await send(http, stack.api.url, tenant, {"message": "hello", "session_id": session})
    assert reply.status_code == 202, reply.text
    task_id: str = reply.json()["task_id"]
    await finished(http, tenant, task_id)
    await persisted(http, tenant, session, 2)
    return task_id


async def test_history_without_a_limit_is_answered_when_the_page_max_is_below_50(
    stack: Deployment,
) -> None:
    """`limit` is optional; a valid ORCHESTRATOR_HISTORY_PAGE_MAX under the default page size
    (50) must not turn every request that omits it into a 422."""
    tenant, session = unique("t"), unique("s")
    async with httpx.AsyncClient(base_url=stack.api.url, timeout=10) as http:
        await chat(http, stack, tenant, session)
        reply = await http.get(f"/api/sessions/{session}/messages", headers=auth(tenant))
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["messages"]) == 2


async def test_an_erased_sessions_answer_is_not_served_by_the_task_endpoint(
    stack: Deployment,
) -> None:
    """DELETE /api/sessions/{id} erases the session's history (the persisted task state too);
    the answer must not stay readable through GET /api/chat/tasks/{id}."""
    tenant, session = unique("t"), unique("s")
    async with httpx.AsyncClient(base_url=stack.api.url, timeout=10) as http:
        task_id = await chat(http, stack, tenant, session)
        erased = await http.delete(f"/api/sessions/{session}", headers=auth(tenant))
        assert erased.status_code == 200, erased.text
        gone = await http.get(
            f"/api/sessions/{session}/messages", params={"limit": 5}, headers=auth(tenant)
        )
        assert gone.status_code == 404
        status = await http.get(f"/api/chat/tasks/{task_id}", headers=auth(tenant))
    assert status.status_code == 404, status.text


async def test_a_task_expired_from_redis_answers_in_the_same_shape_from_postgres(
    stack: Deployment, servers: tuple[RedisServer, PostgresServer]
) -> None:
    """README: "Task status is answered from PostgreSQL once Redis has expired the task"; the
    answer must be the one Redis gave."""
    tenant, session = unique("t"), unique("s")
    async with httpx.AsyncClient(base_url=stack.api.url, timeout=10) as http:
        task_id = await chat(http, stack, tenant, session)
        from_redis = await finished(http, tenant, task_id)
        client = Redis.from_url(servers[0].url)
        try:
            assert await client.delete(keys.task_state(tenant, session, task_id)) == 1
        finally:
            await client.aclose()
        reply = await http.get(f"/api/chat/tasks/{task_id}", headers=auth(tenant))
    assert reply.status_code == 200, reply.text
    assert reply.json() == from_redis


async def test_cancelling_a_task_expired_from_redis_is_a_409_like_any_final_task(
    stack: Deployment, servers: tuple[RedisServer, PostgresServer]
) -> None:
    """Once Redis has expired a finished task, its status is answered from PostgreSQL
    (completed); cancelling it must be the documented 409 for a final task, not a 404 that
    says the task the status endpoint just showed does not exist."""
    tenant, session = unique("t"), unique("s")
    async with httpx.AsyncClient(base_url=stack.api.url, timeout=10) as http:
        task_id = await chat(http, stack, tenant, session)
        client = Redis.from_url(servers[0].url)
        try:  # what the TTLs do after TASK_TTL_SECONDS
            expired = await client.delete(
                keys.task_state(tenant, session, task_id), keys.task_location(task_id)
            )
            assert expired == 2
        finally:
            await client.aclose()
        status = await http.get(f"/api/chat/tasks/{task_id}", headers=auth(tenant))
        assert status.status_code == 200, status.text
        assert status.json()["status"] == "completed"
        cancel = await http.post(
            "/api/chat/cancel", json={"task_id": task_id}, headers=auth(tenant)
        )
    assert cancel.status_code == 409, cancel.text


async def test_a_token_whose_sub_holds_a_nul_is_refused(
    stack: Deployment, servers: tuple[RedisServer, PostgresServer]
) -> None:
    """`sub` was any string the issuer chose, and the history of "alice\x00admin" was written
    with the NUL cleaned to U+FFFD: the same history user as "alice\ufffdadmin", who then saw
    the other's conversations in `GET /api/sessions`. Refused now (records an earlier version
    left are still written with the NUL cleaned: the writer's own tests)."""
    tenant, session = unique("t"), unique("s")
    headers = auth(tenant, user="alice\x00admin")
    async with httpx.AsyncClient(base_url=stack.api.url, timeout=10) as http:
        reply = await http.post(
            "/api/chat/send", json={"message": "hello", "session_id": session}, headers=headers
        )
    assert reply.status_code == 401, reply.text
    assert "NUL" in reply.json()["error"]["message"]

"""History pages while the persistence writer is still committing records, and an erasure
that races a send, on real processes (Valkey, PostgreSQL, api, worker and its writer,
executor, sockets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child, LocalStack
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, deploy, redis_client


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
) -> Iterator[tuple[LocalStack, Child]]:
    redis, database = servers
    with deploy(
        redis,
        tmp_path_factory.mktemp("logs"),
        database_url=database.url(),
        worker_sleep_seconds="0.05",
        session_log_maxlen="10",
        **FAST_EXECUTOR,
    ) as deployed:
        yield deployed.stack, deployed.api


@pytest.fixture
async def api(stack: tuple[LocalStack, Child]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack[1].url, timeout=10) as http:
        yield http


@pytest.fixture
async def rds(servers: tuple[RedisServer, PostgresServer]) -> AsyncIterator[Redis]:
    client = redis_client(servers[0])
    yield client
    await client.aclose()


async def page(api: httpx.AsyncClient, tenant: str, session: str, **params: Any) -> httpx.Response:
    return await api.get(f"/api/sessions/{session}/messages", params=params, headers=auth(tenant))


async def persisted(
    api: httpx.AsyncClient, tenant: str, task_id: str, *, in_redis_too: bool = False
) -> None:
    """Wait until the writer has committed `task_id`: answered by PostgreSQL (it was never in
    Redis's task states), or, for a real task (`in_redis_too`), found in its session's
    history."""
    deadline = time.monotonic() + 20
    while True:
        if in_redis_too:
            status = await api.get(f"/api/chat/tasks/{task_id}", headers=auth(tenant))
            session = status.json().get("session_id")
            reply = await page(api, tenant, session, limit=200)
            if reply.status_code == 200 and any(
                m["task_id"] == task_id for m in reply.json()["messages"]
            ):
                return
        else:
            reply = await api.get(f"/api/chat/tasks/{task_id}", headers=auth(tenant))
            if reply.status_code == 200:
                return
        assert time.monotonic() < deadline, f"{task_id} never persisted: {reply.text}"
        await asyncio.sleep(0.05)


async def walk_forward(
    api: httpx.AsyncClient, tenant: str, session: str, first: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every message from `first` (query params) following next_cursor until it is null."""
    found: list[dict[str, Any]] = []
    params = dict(first)
    limit = params.get("limit")
    for _ in range(10_000):
        reply = await page(api, tenant, session, **params)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        found.extend(body["messages"])
        if not body["next_cursor"]:
            return found
        params = {"cursor": body["next_cursor"]}
        if limit is not None:
            params["limit"] = limit
    raise AssertionError("never reached the end")


async def finished(api: httpx.AsyncClient, tenant: str, task_id: str) -> dict[str, Any]:
    """The task's state once final (from Redis while it is there)."""
    deadline = time.monotonic() + 30
    while True:
        reply = await api.get(f"/api/chat/tasks/{task_id}", headers=auth(tenant))
        body: dict[str, Any] = reply.json()
        if body.get("status") in ("completed", "failed", "cancelled", "timed_out"):
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


async def test_a_client_told_resumed_false_gets_every_task_that_ended_after_its_last_id(
    servers: tuple[RedisServer, PostgresServer], stack: tuple[LocalStack, Child]
) -> None:
    """README: a client told `resumed: false` calls `after_event_id=<last id it saw>` and
    gets the tasks that finished after it. The writer is behind here (its transaction waits
    on a row lock, as behind any slow transaction): history answered 200 with none of them and
    no sign that more was coming, so the client (README `missed`) never showed them. The page
    says how many are on their way (`pending`), and has them once they are written."""
    api = stack[1]
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        first = await send(http, api.url, tenant, {"message": "seen", "session_id": session})
        seen = await events_until(ws, final_of(first.json()["task_id"]))
        await ws.close()
        last_id = seen[-1]["id"]
        await persisted(http, tenant, first.json()["task_id"], in_redis_too=True)

        blocker = await asyncpg.connect(servers[1].url())
        try:
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute(
                "SELECT 1 FROM sessions WHERE tenant_id = $1 AND session_id = $2 FOR UPDATE",
                tenant,
                session,
            )
            missed = []
            for n in range(3):  # long streams: far more events than the log's 10 entries
                reply = await send(
                    http, api.url, tenant,
                    {"message": f"missed {n}", "stream": True, "session_id": session,
                     "context": {"simulate": {"repeat": 40}}},
                )  # fmt: skip
                assert reply.status_code == 202, reply.text
                missed.append(reply.json()["task_id"])
            for task_id in missed:
                await finished(http, tenant, task_id)
            ws, ack = await connect(api.ws_url, tenant, session, last_event_id=last_id)
            await ws.close()
            assert ack["data"]["resumed"] is False, ack

            early = await page(http, tenant, session, after_event_id=last_id)
            assert early.status_code == 200, early.text
            assert early.json()["pending"] == len(missed), early.json()
        finally:
            await blocker.close()
        gap = await walk_forward(http, tenant, session, {"after_event_id": last_id})
    got = sorted({m["task_id"] for m in gap})
    assert got == sorted(missed), f"catch-up answered 200 with {got}, not the 3 missed tasks"


async def test_a_task_sent_while_its_session_is_being_erased_is_not_kept_in_history(
    servers: tuple[RedisServer, PostgresServer], stack: tuple[LocalStack, Child], rds: Redis
) -> None:
    """README: `DELETE /api/sessions/{id}` erases the history, the log and the task states,
    and `GET /api/chat/tasks/{id}` then answers 404. A task sent while the erasure was under
    way (its PostgreSQL transaction begun, its Redis part not yet) had its Redis state erased
    by that DELETE, yet its record was dated after the tombstone and kept: once the DELETE had
    answered 200 the task was served from PostgreSQL and its messages were in the history."""
    api = stack[1]
    tenant, session = unique("t"), unique("s")
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        old = await send(http, api.url, tenant, {"message": "old", "session_id": session})
        await persisted(http, tenant, old.json()["task_id"], in_redis_too=True)

        blocker = await asyncpg.connect(servers[1].url())
        try:
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute(
                "SELECT 1 FROM messages WHERE tenant_id = $1 AND session_id = $2 FOR UPDATE",
                tenant,
                session,
            )
            erase = asyncio.create_task(
                http.delete(f"/api/sessions/{session}", headers=auth(tenant))
            )
            # The erasure's transaction (its tombstone written) now waits on our row lock.
            deadline = time.monotonic() + 20
            while not await blocker.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"):
                assert time.monotonic() < deadline, "the erasure never waited on our lock"
                assert not erase.done(), "the erasure did not wait on our lock"
                await asyncio.sleep(0.02)
            during = await send(http, api.url, tenant, {"message": "during", "session_id": session})
            assert during.status_code == 202, during.text
            task_id = during.json()["task_id"]
            await finished(http, tenant, task_id)
            await lock.rollback()
            erased = await erase
        finally:
            await blocker.close()
        assert erased.status_code == 200, erased.text
        # Wait until the writer has taken in every record published so far.
        deadline = time.monotonic() + 20
        while True:
            groups = await rds.xinfo_groups("{persist}:records")
            if all(g["pending"] == 0 and g.get("lag") == 0 for g in groups):
                break
            assert time.monotonic() < deadline, groups
            await asyncio.sleep(0.05)
        status = await http.get(f"/api/chat/tasks/{task_id}", headers=auth(tenant))
        history = await page(http, tenant, session)
    kept = [m["message_id"] for m in history.json().get("messages", [])]
    assert (status.status_code, kept) == (404, []), (
        f"after the DELETE answered 200: task status {status.status_code} {status.text[:120]},"
        f" history {kept}"
    )

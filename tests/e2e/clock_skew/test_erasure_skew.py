"""Session erasure compares PostgreSQL's clock (`erased_at = now()`) with an api pod's clock
(the record's `created_at`): with pods a minute off, erasure drops new history or keeps
erased history."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.exceptions import ResponseError

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child, LocalStack
from services.core import keys
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.clock_skew.helpers import start_skewed_api
from tests.e2e.conftest import FAST_EXECUTOR, new_stack, redis_client

pytestmark = pytest.mark.e2e

SKEW = 60.0  # seconds: an api pod one minute off PostgreSQL's clock


@pytest.fixture(scope="module")
def skew_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Child, Child]]:
    """An api a minute behind and one a minute ahead, one worker (with the writer), one
    executor, a real PostgreSQL."""
    postgres = PostgresServer(durable=False).start()
    stack: LocalStack | None = None
    try:
        asyncio.run(migrate(postgres.url()))
        stack = new_stack(
            redis_server,
            tmp_path_factory.mktemp("logs"),
            database_url=postgres.url(),
            **FAST_EXECUTOR,
        )
        behind = start_skewed_api(stack, -SKEW)
        ahead = start_skewed_api(stack, SKEW)
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(behind, ahead)
        yield behind, ahead
    finally:
        if stack is not None:
            stack.stop()
        postgres.cleanup()


async def _added(redis: Any) -> int:
    """Records ever added to the writer's stream."""
    with contextlib.suppress(ResponseError):  # no stream yet
        return int((await redis.xinfo_stream(keys.PERSIST_RECORDS))["entries-added"])
    return 0


async def _persisted(redis: Any, records: int) -> None:
    """`records` finished tasks' records have reached the writer's stream, and the writer has
    taken every one of them."""
    deadline = time.monotonic() + 30
    while True:
        if await _added(redis) >= records:
            pending = await redis.xpending(keys.PERSIST_RECORDS, keys.PERSIST_GROUP)
            groups = await redis.xinfo_groups(keys.PERSIST_RECORDS)
            group = keys.PERSIST_GROUP.encode()
            lag = next(int(g["lag"] or 0) for g in groups if g["name"] == group)
            if not pending["pending"] and not lag:
                return
        assert time.monotonic() < deadline, "the persistence backlog never drained"
        await asyncio.sleep(0.05)


async def _chat(http: httpx.AsyncClient, api: Child, tenant: str, session: str, text: str) -> str:
    ws, _ = await connect(api.ws_url, tenant, session)
    try:
        reply = await send(http, api.url, tenant, {"message": text, "session_id": session})
        assert reply.status_code == 202, reply.text
        task_id = str(reply.json()["task_id"])
        events = await events_until(ws, final_of(task_id))
        assert events[-1]["type"] == "chat.response", events[-1]
        return task_id
    finally:
        await ws.close()


async def test_a_message_sent_after_the_erasure_is_kept_in_the_history(
    skew_stack: tuple[Child, Child], redis_server: RedisServer
) -> None:
    """Observed: the api a minute behind stamps the new task `created_at` = now - 60 s, the
    writer takes it for a task of before the erasure (`erased_at` = PostgreSQL now()) and
    writes none of its messages: the conversation after an erasure is silently lost."""
    behind, _ = skew_stack
    tenant, session = unique("t"), unique("s")
    redis = redis_client(redis_server)
    try:
        base = await _added(redis)
        async with httpx.AsyncClient(timeout=10) as http:
            await _chat(http, behind, tenant, session, "before the erasure")
            await _persisted(redis, base + 1)
            erased = await http.delete(f"{behind.url}/api/sessions/{session}", headers=auth(tenant))
            assert erased.status_code == 200, erased.text
            await _chat(http, behind, tenant, session, "after the erasure")
            await _persisted(redis, base + 2)
            history = await http.get(
                f"{behind.url}/api/sessions/{session}/messages", headers=auth(tenant)
            )
    finally:
        await redis.aclose()
    # 404 "session not found": the writer kept no message of the session at all
    assert history.status_code in (200, 404), history.text
    messages = history.json()["messages"] if history.status_code == 200 else []
    contents = [m["content"] for m in messages]
    assert any("after the erasure" in c for c in contents), (
        f"the message sent after the erasure is missing from the history: {history.text}"
    )


async def test_a_task_running_at_the_erasure_does_not_come_back_into_the_history(
    skew_stack: tuple[Child, Child], redis_server: RedisServer
) -> None:
    """Observed: the api a minute ahead stamps `created_at` = now + 60 s; the record of the
    task the erasure cancels (published by the erasure itself) is then "created after the
    erasure" for the writer, and the erased user message is written back into the history."""
    _, ahead = skew_stack
    tenant, session = unique("t"), unique("s")
    redis = redis_client(redis_server)
    try:
        base = await _added(redis)
        async with httpx.AsyncClient(timeout=10) as http:
            reply = await send(
                http,
                ahead.url,
                tenant,
                {
                    "message": "erase me while I run",
                    "session_id": session,
                    "context": {"simulate": {"stall": True}},
                },
            )
            assert reply.status_code == 202, reply.text
            erased = await http.delete(f"{ahead.url}/api/sessions/{session}", headers=auth(tenant))
            assert erased.status_code == 200, erased.text
            await _persisted(redis, base + 1)  # the cancelled record the erasure publishes
            history = await http.get(
                f"{ahead.url}/api/sessions/{session}/messages", headers=auth(tenant)
            )
    finally:
        await redis.aclose()
    # 404 "session not found" is the expected answer: nothing of it is left
    assert history.status_code in (200, 404), history.text
    messages = history.json()["messages"] if history.status_code == 200 else []
    contents = [m["content"] for m in messages]
    assert contents == [], f"erased messages came back into the history: {contents}"

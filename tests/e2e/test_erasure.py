"""`DELETE /api/sessions/{id}` on real processes, racing what the session still does: a task
streaming while it is erased, and a send retried with its `Idempotency-Key` afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child, LocalStack
from services.core import keys
from services.core.actions import ChatCancel, decode_action
from services.core.streams import parse_read
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, connect, next_event, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, new_stack, redis_client

pytestmark = pytest.mark.e2e

# Keys enough for the erasure's SCAN of the keyspace to take a while, as in production.
FILL = """
for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'filler:' .. i, 'x') end
return 1
"""


@pytest.fixture(scope="module")
def erasure_redis() -> Iterator[RedisServer]:
    """A server of its own: the filler keys stay out of every other test's keyspace."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def erasure_stack(
    erasure_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Child, Child]]:
    postgres = PostgresServer(durable=False).start()
    stack: LocalStack | None = None
    try:
        asyncio.run(migrate(postgres.url()))
        stack = new_stack(
            erasure_redis,
            tmp_path_factory.mktemp("logs"),
            database_url=postgres.url(),
            **FAST_EXECUTOR,
        )
        a, b = stack.start_api(), stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(a, b)
        yield a, b
    finally:
        if stack is not None:
            stack.stop()
        postgres.cleanup()


async def _final(http: httpx.AsyncClient, api: Child, tenant: str, task_id: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        reply = await http.get(f"{api.url}/api/chat/tasks/{task_id}", headers=auth(tenant))
        if reply.status_code == 200 and reply.json()["status"] == "completed":
            return
        assert time.monotonic() < deadline, f"task {task_id} never completed: {reply.text}"
        await asyncio.sleep(0.05)


async def _persisted(redis: Any) -> None:
    deadline = time.monotonic() + 30
    while await redis.xlen(keys.PERSIST_RECORDS):
        assert time.monotonic() < deadline, "the persistence backlog never drained"
        await asyncio.sleep(0.05)


async def test_a_session_erased_while_its_task_streams_keeps_no_event_and_stops_the_aes(
    erasure_stack: tuple[Child, Child], erasure_redis: RedisServer
) -> None:
    """The log was deleted before the SCAN for the session's tasks: every chunk the worker
    applied meanwhile (the task still existed) made the log again, and a socket resuming from
    it was given the erased answer. The AES was not told either and answered for nobody."""
    a, b = erasure_stack
    redis = redis_client(erasure_redis)
    await redis.eval(FILL, 0, 400_000)
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(a.ws_url, tenant, session)
    body = {
        "message": "secret words",
        "session_id": session,
        "stream": True,
        "context": {"simulate": {"repeat": 200, "chunk_delay_ms": 5}},
    }
    async with httpx.AsyncClient() as http:
        sent = await send(http, a.url, tenant, body)
        assert sent.status_code == 202, sent.text
        task_id = sent.json()["task_id"]
        while (await next_event(ws))["type"] != "chat.chunk":
            pass
        erased = await http.delete(
            f"{b.url}/api/sessions/{session}", headers=auth(tenant), timeout=30
        )
    await ws.close()
    assert erased.status_code == 200, erased.text
    left = await redis.xrange(keys.session_log(tenant, session))
    notices = [
        decode_action(entry.raw_action or b"")
        for entry in parse_read(await redis.xread({keys.CANCEL_STREAM: "0-0"}))
    ]
    await redis.aclose()
    assert left == [], f"{len(left)} events of the erased task in its session log"
    assert any(isinstance(n, ChatCancel) and n.task_id == task_id for n in notices), notices


async def test_an_idempotency_key_sent_again_after_its_session_was_erased_sends_nothing(
    erasure_stack: tuple[Child, Child], erasure_redis: RedisServer
) -> None:
    """The key's task state gone with the session, the retry was taken for a send that never
    queued its task: the erased message was sent, answered, charged and written again."""
    a, b = erasure_stack
    redis = redis_client(erasure_redis)
    tenant, session = unique("t"), unique("s")
    body = {"message": "erase me", "session_id": session}
    async with httpx.AsyncClient() as http:
        first = await send(http, a.url, tenant, body, **{"Idempotency-Key": "k-1"})
        assert first.status_code == 202, first.text
        task_id = first.json()["task_id"]
        await _final(http, a, tenant, task_id)
        await _persisted(redis)
        erased = await http.delete(f"{b.url}/api/sessions/{session}", headers=auth(tenant))
        assert erased.status_code == 200, erased.text
        again = await send(http, a.url, tenant, body, **{"Idempotency-Key": "k-1"})
        history = await http.get(f"{a.url}/api/sessions/{session}/messages", headers=auth(tenant))
    await redis.aclose()
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "conflict"
    assert again.json()["error"]["details"] == {"task_id": task_id}
    assert history.status_code == 404, history.text  # nothing sent again


async def _scans(redis: Any) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


async def _completed_tasks(
    http: httpx.AsyncClient, api: Child, tenant: str, session: str, count: int
) -> list[str]:
    task_ids = []
    for n in range(count):
        sent = await send(http, api.url, tenant, {"message": f"m{n}", "session_id": session})
        assert sent.status_code == 202, sent.text
        task_ids.append(sent.json()["task_id"])
    for task_id in task_ids:
        await _final(http, api, tenant, task_id)
    return task_ids


async def test_an_erasure_reads_the_sessions_task_index_not_the_whole_keyspace(
    erasure_stack: tuple[Child, Child], erasure_redis: RedisServer
) -> None:
    """Each DELETE SCANned every key of the deployment for the session's task states: ~400
    SCAN round trips here (400 000 other keys), seconds with tens of millions, and on a
    cluster every primary's keyspace. The session's index lists them."""
    a, b = erasure_stack
    redis = redis_client(erasure_redis)
    if await redis.dbsize() < 100_000:
        await redis.eval(FILL, 0, 400_000)
    since = await redis.get(keys.TASK_INDEX_SINCE)
    await redis.set(keys.TASK_INDEX_SINCE, 0)  # every living task was created indexed
    tenant, session = unique("t"), unique("s")
    try:
        async with httpx.AsyncClient() as http:
            task_ids = await _completed_tasks(http, a, tenant, session, 3)
            before = await _scans(redis)
            erased = await http.delete(f"{b.url}/api/sessions/{session}", headers=auth(tenant))
            scans = await _scans(redis) - before
            looked_up = [
                await http.get(f"{a.url}/api/chat/tasks/{task_id}", headers=auth(tenant))
                for task_id in task_ids
            ]
        states = [await redis.exists(keys.task_state(tenant, session, t)) for t in task_ids]
        indexed = await redis.zcard(keys.session_tasks(tenant, session))
    finally:
        await redis.set(keys.TASK_INDEX_SINCE, since or 0)
        await redis.aclose()
    assert erased.status_code == 200, erased.text
    assert scans == 0, f"{scans} SCANs for one session's erasure"
    assert states == [0, 0, 0]
    assert [reply.status_code for reply in looked_up] == [404, 404, 404]
    assert indexed == 0, "the erased tasks are still in the session's index"


async def test_an_erasure_soon_after_an_upgrade_finds_tasks_an_older_version_did_not_index(
    erasure_stack: tuple[Child, Child], erasure_redis: RedisServer
) -> None:
    """An api of the version before the index created tasks no index lists; until they may
    all have expired (TASK_TTL_SECONDS past the longest deadline), erasures still SCAN."""
    a, b = erasure_stack
    redis = redis_client(erasure_redis)
    since = await redis.get(keys.TASK_INDEX_SINCE)
    await redis.set(keys.TASK_INDEX_SINCE, int(time.time() * 1000))  # the upgrade: now
    tenant, session = unique("t"), unique("s")
    try:
        async with httpx.AsyncClient() as http:
            indexed, unindexed = await _completed_tasks(http, a, tenant, session, 2)
            await redis.zrem(keys.session_tasks(tenant, session), unindexed)  # made by the old
            erased = await http.delete(f"{b.url}/api/sessions/{session}", headers=auth(tenant))
        states = [
            await redis.exists(keys.task_state(tenant, session, t)) for t in (indexed, unindexed)
        ]
    finally:
        await redis.set(keys.TASK_INDEX_SINCE, since or 0)
        await redis.aclose()
    assert erased.status_code == 200, erased.text
    assert states == [0, 0]

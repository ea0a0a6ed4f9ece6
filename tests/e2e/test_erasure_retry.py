"""An erasure that failed part way, then retried, as a 5xx tells the client to (found by the
review of this session's changes): its sockets never learned the running task ended."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child, LocalStack
from services.core import keys
from services.persistence.migrate import migrate
from services.persistence.records import decode_record
from tests.e2e.clients import auth, connect, events_until, unique
from tests.e2e.conftest import new_stack
from tests.e2e.test_external_aes import start_task

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api_without_worker(
    own_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, Child]]:
    """One api with PostgreSQL and no worker: sent tasks stay `processing`, and nothing reads
    the records stream the test breaks."""
    postgres = PostgresServer(durable=False).start()
    stack = new_stack(own_redis, tmp_path_factory.mktemp("logs"), database_url=postgres.url())
    try:
        asyncio.run(migrate(postgres.url()))
        api = stack.start_api()
        stack.wait_ready(api)
        yield stack, api
    finally:
        stack.stop()
        postgres.cleanup()


async def erase_after_a_failed_attempt(
    redis: Redis, http: httpx.AsyncClient, tenant: str, session: str
) -> None:
    """A DELETE that fails after erasing the task states (the records stream has the wrong
    type, so the record for PostgreSQL cannot be queued; in production a lost connection or
    a killed pod), then its retry, as the 5xx tells the client to."""
    await redis.delete(keys.PERSIST_RECORDS)
    await redis.set(keys.PERSIST_RECORDS, "not a stream")
    first = await http.delete(f"/api/sessions/{session}", headers=auth(tenant))
    assert first.status_code >= 500, first.text
    await redis.delete(keys.PERSIST_RECORDS)
    retried = await http.delete(f"/api/sessions/{session}", headers=auth(tenant))
    assert retried.status_code == 200, retried.text


async def test_a_retried_erasure_tells_the_sockets_the_running_task_ended(
    api_without_worker: tuple[LocalStack, Child],
) -> None:
    """The first DELETE erases the task states (the running task is kept, ended as cancelled
    by `erase:0`) and then fails (here: the record for PostgreSQL cannot be queued; in
    production a lost connection or a killed pod). The retry finds the task `kept` and tells
    its AES again (chat_service: "an earlier erasure may have failed before telling its AES")
    but not the sockets: the page showing the task waits for its end for ever."""
    stack, api = api_without_worker
    redis = Redis.from_url(stack.env["ORCHESTRATOR_REDIS_URL"])
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task = await start_task(api, tenant, session)
    await events_until(ws, lambda e: e.get("task_id") == task)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        await erase_after_a_failed_attempt(redis, http, tenant, session)
        # A later task of the session: its first event comes after anything the retry sent.
        later = await start_task(api, tenant, session)
    seen = await events_until(ws, lambda e: e.get("task_id") == later)
    await ws.close()
    await redis.aclose()
    ended = [e for e in seen if e.get("task_id") == task and e["type"] == "chat.cancelled"]
    assert ended, (
        f"the erasure (retried after it failed part way) ended task {task}, but the socket "
        f"open on the session never got its chat.cancelled: {[e['type'] for e in seen]}"
    )


async def test_a_retried_erasure_still_queues_the_running_task_record(
    api_without_worker: tuple[LocalStack, Child],
) -> None:
    """Same failure: the retry found the running task kept and queued no record for it (the
    first attempt failed before queueing one), so PostgreSQL never learnt of the request and
    `/api/usage` never counted it (README: an erased session's usage stays counted). The stub
    keeps what the record needs (no message), and the retry queues it."""
    stack, api = api_without_worker
    redis = Redis.from_url(stack.env["ORCHESTRATOR_REDIS_URL"])
    tenant, session = unique("t"), unique("s")
    task = await start_task(api, tenant, session)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        await erase_after_a_failed_attempt(redis, http, tenant, session)
    records = [decode_record(fields[b"action"]) for _, fields in await redis.xrange(
        keys.PERSIST_RECORDS)]  # fmt: skip
    state = await redis.hgetall(keys.task_state(tenant, session, task))
    await redis.aclose()
    [record] = [r for r in records if r.task_id == task]
    assert (record.status, record.message, record.tenant_id) == ("cancelled", "", tenant)
    assert b"action" not in state  # the stub keeps no message

"""A message whose session is erased while it runs (README: "a task still running is dropped
and its AES told to stop with `chat.cancel`"), followed on its trace: api, worker, executor,
Valkey, PostgreSQL (erasure needs the history) and the OTLP sink, all real."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child, LocalStack
from services.core import keys
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, connect, events_until, send, unique
from tests.e2e.test_tracing_cases import _chat_process
from tests.e2e.traces.conftest import FullReceiver, new_stack
from tests.e2e.traces.helpers import of_task, short, trace_id_of, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def traced_with_history(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, Child, FullReceiver]]:
    receiver = FullReceiver().start()
    postgres = PostgresServer(durable=False).start()
    stack = new_stack(
        e2e_redis,
        tmp_path_factory.mktemp("logs"),
        executor_chunk_delay_ms="1",
        database_url=postgres.url(),
    )
    stack.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    stack.env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    try:
        asyncio.run(migrate(postgres.url()))
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        yield stack, api, receiver
    finally:
        stack.stop()
        receiver.stop()
        postgres.cleanup()


async def test_a_run_stopped_by_the_erasure_of_its_session_says_so_on_its_trace(
    traced_with_history: tuple[LocalStack, Child, FullReceiver], e2e_redis: RedisServer
) -> None:
    """Guard (no existing test traces an erasure): the executor's run of a message whose
    session is erased ends on the message's trace with `orchestrator.outcome: cancelled`,
    and the erasure's `chat.cancel` is a PRODUCER `send {aes}:cancel` naming the task."""
    _, api, receiver = traced_with_history
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant,
            {"message": "erase me", "session_id": session,
             "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
        task_id = reply.json()["task_id"]
        redis = Redis.from_url(e2e_redis.url)
        try:
            action = await _chat_process(redis, task_id)
            stream = keys.aes_stream(action["priority"])
            deadline = time.monotonic() + 10
            while not (await redis.xpending(stream, keys.AES_GROUP))["pending"]:
                assert time.monotonic() < deadline, "the executor never took the task"
                await asyncio.sleep(0.05)
        finally:
            await redis.aclose()
        erased = await http.delete(f"{api.url}/api/sessions/{session}", headers=auth(tenant))
        assert erased.status_code in (200, 202, 204), erased.text
    await events_until(ws, lambda e: e["type"] == "session.erased")
    await ws.close()
    message_trace = trace_id_of(action)

    def ended(spans: list) -> bool:
        return any(
            s.service.endswith("executor")
            and s.kind == "CONSUMER"
            and "orchestrator.outcome" in s.attributes
            for s in of_task(spans, task_id)
        ) and any(s.name == f"send {keys.CANCEL_STREAM}" for s in of_task(spans, task_id))

    spans = await wait_for(receiver, ended)
    trace = [s for s in spans if s.trace_id == message_trace]
    runs = [s for s in trace if s.service.endswith("executor") and s.kind == "CONSUMER"]
    assert runs, f"the run is not on the message's trace: {short(trace)}"
    assert runs[0].attributes.get("orchestrator.outcome") == "cancelled", runs[0].attributes
    notices = [s for s in of_task(spans, task_id) if s.name == f"send {keys.CANCEL_STREAM}"]
    assert notices, short(of_task(spans, task_id))
    assert notices[0].kind == "PRODUCER", short(notices)

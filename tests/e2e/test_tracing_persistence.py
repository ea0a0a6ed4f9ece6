"""The persistence hop on the message's trace: the writer's span for a message's record joins
the trace its send began, and shows a write that had to wait for PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.otlp_sink import ReceivedSpan, Receiver
from services.cli.stack import Child, LocalStack
from services.core import keys
from services.persistence.migrate import migrate
from services.persistence.records import publish_record
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.conftest import new_stack
from tests.e2e.test_log_volume import log_lines
from tests.e2e.test_tracing import ancestry, trace_of
from tests.persistence.conftest import make_record

pytestmark = pytest.mark.e2e

WRITER_SPAN = f"process {keys.PERSIST_RECORDS}"
STATUS_ERROR = 2  # OTLP's Status.STATUS_CODE_ERROR


@pytest.fixture(scope="module")
def recorded(
    own_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Child, Child, Receiver, PostgresServer]]:
    """api, worker (with its persistence writer) and executor on their own PostgreSQL,
    exporting spans to an OTLP sink."""
    postgres = PostgresServer(durable=False).start()
    asyncio.run(migrate(postgres.url()))
    receiver = Receiver().start()
    stack: LocalStack = new_stack(
        own_redis,
        tmp_path_factory.mktemp("logs"),
        database_url=postgres.url(),
        executor_chunk_delay_ms="1",
        persist_retry_max_seconds="0.5",
    )
    stack.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    stack.env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    try:
        api = stack.start_api()
        worker = stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        yield api, worker, receiver, postgres
    finally:
        stack.stop()
        receiver.stop()
        postgres.cleanup()


async def answer(api: Child) -> str:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(http, api.url, tenant, {"message": "keep me", "session_id": session})
    task_id: str = reply.json()["task_id"]
    await events_until(ws, final_of(task_id))
    await ws.close()
    return task_id


async def writer_span(receiver: Receiver, task_id: str) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    """The writer's span of the task's record, once exported, and its trace."""
    spans = await trace_of(receiver, task_id, {"agent-orchestrator-api"})
    deadline = time.monotonic() + 20
    while not (found := [s for s in spans if s.name == WRITER_SPAN]):
        assert time.monotonic() < deadline, sorted({s.name for s in spans})
        await asyncio.sleep(0.05)
        spans = receiver.trace(spans[0].trace_id)
    [span] = found
    return span, spans


async def test_the_written_record_is_on_the_messages_trace(
    recorded: tuple[Child, Child, Receiver, PostgresServer],
) -> None:
    """The trace ended at the worker: nothing said when, or whether, the history was written."""
    api, _, receiver, _ = recorded
    task_id = await answer(api)
    span, spans = await writer_span(receiver, task_id)
    assert span.service == "agent-orchestrator-worker"
    assert span.kind == "CONSUMER"
    assert span.attributes["orchestrator.task_id"] == task_id
    assert span.attributes["db.system.name"] == "postgresql"
    assert span.attributes["messaging.consumer.group.name"] == keys.PERSIST_GROUP
    assert span.status_code != STATUS_ERROR
    chain = [(s.service.rsplit("-", 1)[-1], s.kind) for s in reversed(ancestry(spans, span))]
    assert chain[0] == ("api", "SERVER"), chain  # the message's own trace, from its request


async def test_a_write_that_waited_for_postgresql_says_so_on_the_trace(
    recorded: tuple[Child, Child, Receiver, PostgresServer],
) -> None:
    api, worker, receiver, postgres = recorded
    postgres.stop()
    try:
        task_id = await answer(api)  # delivered: PostgreSQL is not on the message path
        deadline = time.monotonic() + 20
        while not [line for line in log_lines(worker) if "database unavailable" in line]:
            assert time.monotonic() < deadline, "the writer never tried to write"
            await asyncio.sleep(0.05)
    finally:
        postgres.start()
    span, _ = await writer_span(receiver, task_id)
    assert "write failed, retrying" in span.events, span.events
    assert span.status_code != STATUS_ERROR  # written in the end


async def test_a_record_postgresql_refuses_is_an_error_on_its_trace(
    recorded: tuple[Child, Child, Receiver, PostgresServer], own_redis: RedisServer
) -> None:
    """A record beyond what PostgreSQL holds (a final event id past bigint) is dead-lettered:
    its span says so, as an error, rather than ending like a written one."""
    _, _, receiver, _ = recorded
    trace_id = secrets.token_hex(16)
    poison = make_record(  # of today: an older one is past the retention, never written
        unique("poison"), event_id=f"{2**63}-0", created_at=datetime.now(UTC)
    )
    poison.trace_context = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    redis = Redis.from_url(own_redis.url)
    try:
        await publish_record(redis, poison)
    finally:
        await redis.aclose()
    deadline = time.monotonic() + 20
    while not (found := [s for s in receiver.trace(trace_id) if s.name == WRITER_SPAN]):
        assert time.monotonic() < deadline, "the refused record's span was never exported"
        await asyncio.sleep(0.05)
    [span] = found
    assert span.status_code == STATUS_ERROR
    assert span.attributes["error.type"] == "dead_lettered"
    assert "error" in span.events

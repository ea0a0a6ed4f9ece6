"""Traces in the cases a second review looked at (a seed AES's answer, a cancel, failures,
the delivery hop's name): real api, worker, executor, Valkey and an OTLP sink."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.otlp_sink import ReceivedSpan, Receiver
from services.cli.stack import Child, LocalStack
from services.core import keys
from tests.e2e.clients import connect, events_until, final_of, send, unique

pytestmark = pytest.mark.e2e

SERVICES = {"agent-orchestrator-api", "agent-orchestrator-worker", "agent-orchestrator-executor"}


async def wait_for(receiver: Receiver, predicate, timeout: float = 20) -> list[ReceivedSpan]:
    """Every received span, once `predicate(spans)` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        with receiver.lock:
            spans = list(receiver.spans)
        if predicate(spans):
            return spans
        assert time.monotonic() < deadline, "the expected spans never arrived"
        await asyncio.sleep(0.05)


def of_task(spans: list[ReceivedSpan], task_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.attributes.get("orchestrator.task_id") == task_id]


async def test_the_delivery_span_name_is_not_one_per_session(
    traced: tuple[LocalStack, Child, Receiver],
) -> None:
    """OTel: span names are of low cardinality (a template where the destination is not).
    The api's delivery CONSUMER span is named `process {s:<tenant>:<session>}:events`: one new
    span name per session ever opened, what the REST spans were fixed for already."""
    _, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(http, api.url, tenant, {"message": "name", "session_id": session})
    task_id = reply.json()["task_id"]
    await events_until(ws, final_of(task_id))
    await ws.close()
    channel = keys.session_channel(tenant, session)
    spans = await wait_for(
        receiver,
        lambda spans: any(s.attributes.get("messaging.destination.name") == channel for s in spans),
    )
    delivery = [s for s in spans if s.attributes.get("messaging.destination.name") == channel]
    names = {s.name for s in delivery}
    assert not any(session in name or tenant in name for name in names), (
        f"span names carry the tenant and session ids: {names}"
    )


async def _chat_process(redis: Redis, task_id: str) -> dict:
    """The task's `chat.process` as the api added it to the AES streams."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for priority in keys.PRIORITIES:
            for _, fields in await redis.xrange(keys.aes_stream(priority)):
                action = json.loads(fields[b"action"])
                if action.get("task_id") == task_id:
                    return action
        await asyncio.sleep(0.05)
    raise AssertionError(f"no chat.process for {task_id}")


async def test_a_seed_execution_callback_stays_on_the_message_trace(
    traced: tuple[LocalStack, Child, Receiver], e2e_redis: RedisServer
) -> None:
    """README (seed compatibility): an AES written for the seed answers with one
    `execution.callback`, applied to the task's current attempt. The worker knows the task's
    trace (its stored `chat.process`, as the timeout span uses), yet its CONSUMER span of the
    callback, and the delivery to the socket after it, start a trace of their own: the
    message's trace ends at the AES, and the answer's hops are an orphan trace."""
    _, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant,
            {"message": "seed", "session_id": session, "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
    task_id = reply.json()["task_id"]
    redis = Redis.from_url(e2e_redis.url)
    try:
        action = await _chat_process(redis, task_id)
        legacy = {
            "action_type": "execution.callback",
            "task_id": task_id,
            "tenant_id": tenant,
            "session_id": session,
            "status": "completed",
            "result": {"response": "answer from a seed AES"},
            "tokens_used": {"input": 1, "output": 2, "total": 3},
        }
        await redis.xadd(action["callback_queue"], {"action": json.dumps(legacy)})
    finally:
        await redis.aclose()
    answer = await events_until(ws, final_of(task_id))
    await ws.close()
    assert answer[-1]["type"] == "chat.response"

    message_trace = action["trace_context"]["traceparent"].split("-")[1]
    spans = await wait_for(
        receiver,
        lambda spans: any(
            s.service == "agent-orchestrator-worker" and s.kind == "CONSUMER"
            for s in of_task(spans, task_id)
        ),
    )
    worker = [
        s for s in of_task(spans, task_id)
        if s.service == "agent-orchestrator-worker" and s.kind == "CONSUMER"
    ]  # fmt: skip
    assert {s.trace_id for s in worker} == {message_trace}, (
        f"the worker's span of the seed callback is in trace {[s.trace_id for s in worker]}, "
        f"not in the message's trace {message_trace} (parent {worker[0].parent_id or 'none'})"
    )


async def test_failed_spans_say_the_error_type(
    traced: tuple[LocalStack, Child, Receiver], e2e_redis: RedisServer
) -> None:
    """OTel (error recording, messaging spans): a span that ends in ERROR carries `error.type`
    (the class of the failure) so that errors can be grouped. The failed attempt's spans, the
    retry's and the timeout's have status ERROR but no `error.type`."""
    from services.core.quotas import QuotaStore
    from services.core.settings import load_settings

    _, api, receiver = traced
    tenant, impatient, session = unique("t"), unique("t"), unique("s")
    redis = Redis.from_url(e2e_redis.url)
    await QuotaStore(redis, load_settings()).set(impatient, "pro", {"taskTimeoutSeconds": 1})
    await redis.aclose()
    ws, _ = await connect(api.ws_url, tenant, session)
    ws_impatient, _ = await connect(api.ws_url, impatient, session)
    async with httpx.AsyncClient() as http:
        retried = (await send(
            http, api.url, tenant,
            {"message": "flaky", "session_id": session,
             "context": {"simulate": {"fail_attempts": 1}}},
        )).json()["task_id"]  # fmt: skip
        stalled = (await send(
            http, api.url, impatient,
            {"message": "stuck", "session_id": session, "context": {"simulate": {"stall": True}}},
        )).json()["task_id"]  # fmt: skip
    await events_until(ws, final_of(retried))
    await events_until(ws_impatient, final_of(stalled), timeout=10)
    await ws.close()
    await ws_impatient.close()

    def both_failed(spans: list[ReceivedSpan]) -> bool:
        timed_out = any(s.name == "task timed out" for s in of_task(spans, stalled))
        retried_trace = {s.trace_id for s in of_task(spans, retried)}
        failed = [s for s in spans if s.trace_id in retried_trace and s.status_code == 2]
        return timed_out and bool(failed)

    spans = await wait_for(receiver, both_failed)
    traces = {s.trace_id for s in of_task(spans, retried) + of_task(spans, stalled)}
    errors = [s for s in spans if s.trace_id in traces and s.status_code == 2]
    assert errors
    untyped = [
        (s.service.rsplit("-", 1)[-1], s.name) for s in errors if "error.type" not in s.attributes
    ]
    assert not untyped, f"ERROR spans without error.type: {untyped}"


async def test_a_cancelled_task_says_so_on_its_trace(
    traced: tuple[LocalStack, Child, Receiver], e2e_redis: RedisServer
) -> None:
    """The executor's CONSUMER span says how its run ended (`orchestrator.outcome`: completed,
    expired). A run cancelled by the client ends its span by the CancelledError, before the
    outcome is set: the span ends as OK with no outcome, as if the answer had gone out, and
    nothing else on the message's trace says the task was cancelled."""
    _, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant,
            {"message": "cancel me", "session_id": session,
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
        cancel = await http.post(
            f"{api.url}/api/chat/cancel", json={"task_id": task_id},
            headers={"Authorization": reply.request.headers["Authorization"]},
        )  # fmt: skip
        assert cancel.status_code == 200, cancel.text
    await events_until(ws, final_of(task_id))
    await ws.close()

    def executed(spans: list[ReceivedSpan]) -> bool:
        return any(s.service.endswith("executor") and s.kind == "CONSUMER"
                   for s in of_task(spans, task_id))  # fmt: skip

    spans = await wait_for(receiver, executed)
    run = next(
        s
        for s in of_task(spans, task_id)
        if s.service.endswith("executor") and s.kind == "CONSUMER"
    )
    assert run.attributes.get("orchestrator.outcome") == "cancelled", (
        f"the cancelled run's span: attributes {run.attributes}, status {run.status_code}"
    )

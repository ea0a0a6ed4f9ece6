"""An SRE following one chat message through its trace: REST spans, an Idempotency-Key
replay, a task that failed for good, a cancel over the socket. Real api, worker, executor,
Valkey and the OTLP sink of tests/e2e (README "Observability": Traces)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from services.core import keys
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.test_tracing_cases import _chat_process
from tests.e2e.traces.conftest import FullReceiver
from tests.e2e.traces.helpers import of_task, short, trace_id_of, wait_for

pytestmark = pytest.mark.e2e

TRACE_B = "00-" + "c3" * 16 + "-" + "d4" * 8 + "-01"


def trace_of_parent(traceparent: str) -> str:
    return traceparent.split("-")[1]


async def test_a_rest_send_span_names_its_route(
    traced: tuple[LocalStack, Child, FullReceiver],
) -> None:
    """An SRE looks for the slow `POST /api/chat/send` requests: OTel's HTTP conventions (and
    services/api/http_tracing.py's own docstring) name a server span `<method> <route>` with
    `http.route`. Every REST span was named by its method alone (`POST`, `GET`, `DELETE`) with
    no `http.route`: the span details are taken when the OTel middleware starts the span,
    which Litestar runs around its router, before `path_template` exists. A send, a cancel
    and an erasure cannot be told apart by name."""
    _, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    async with httpx.AsyncClient() as http:
        reply = await send(http, api.url, tenant, {"message": "route", "session_id": session})
    task_id = reply.json()["task_id"]
    spans = await wait_for(
        receiver,
        lambda spans: any(s.kind == "PRODUCER" for s in of_task(spans, task_id)),
    )
    producer = next(s for s in of_task(spans, task_id) if s.kind == "PRODUCER")
    server = next(s for s in receiver.trace(producer.trace_id) if s.span_id == producer.parent_id)
    assert (server.name, server.attributes.get("http.route")) == (
        "POST /api/chat/send",
        "/api/chat/send",
    ), f"the send's server span: name {server.name!r}, attributes {server.attributes}"


async def test_an_idempotent_replay_leads_to_the_messages_trace(
    traced: tuple[LocalStack, Child, FullReceiver],
) -> None:
    """README: one trace per chat message. A client retries its send under the same
    `Idempotency-Key` (its first answer was lost) and is answered with the first task; the
    SRE opens the retry's trace (its `traceparent`, from the browser) to see what became of
    it. Expected: the replay's span says which task answered it (`orchestrator.task_id`) or
    links to the message's trace. It was a lone `POST` span with neither, so the replayed
    request cannot be followed to the message it returned (nor told apart from a send that
    failed before queueing anything)."""
    _, api, receiver = traced
    tenant, session, key = unique("t"), unique("s"), unique("k")
    first_parent = "00-" + "e5" * 16 + "-" + "b2" * 8 + "-01"
    body = {"message": "replay", "session_id": session}
    async with httpx.AsyncClient() as http:
        first = await send(
            http, api.url, tenant, body, **{"Idempotency-Key": key, "traceparent": first_parent}
        )
        replay = await send(
            http, api.url, tenant, body, **{"Idempotency-Key": key, "traceparent": TRACE_B}
        )
    assert replay.status_code == 202, replay.text
    task_id = first.json()["task_id"]
    assert replay.json()["task_id"] == task_id
    message_trace = trace_of_parent(first_parent)
    replay_trace = trace_of_parent(TRACE_B)
    spans = await wait_for(
        receiver,
        lambda spans: (
            any(s.trace_id == replay_trace for s in spans)
            and any(s.kind == "PRODUCER" for s in of_task(spans, task_id))
        ),
    )
    replayed = [s for s in spans if s.trace_id == replay_trace]
    assert replayed, "the replay made no span at all"
    assert not [s for s in replayed if s.kind == "PRODUCER"], "the replay queued a second task"
    assert {s.trace_id for s in of_task(spans, task_id) if s.kind == "PRODUCER"} == {message_trace}
    found = [s for s in replayed if s.attributes.get("orchestrator.task_id") == task_id or s.links]
    assert found, (
        f"the replay's trace {short(replayed)} names no task and links nowhere "
        f"(attributes {[s.attributes for s in replayed]})"
    )


async def test_a_task_that_failed_for_good_is_an_error_on_its_trace(
    traced: tuple[LocalStack, Child, FullReceiver], e2e_redis: RedisServer
) -> None:
    """An AES that does not trace itself copies the action's `trace_context` into its
    `execution.failed` (`retryable: false`), as README "For AES teams" asks. The client gets
    `chat.error`; the SRE opens the message's trace and expects the failure to show as an
    error (README: failures, retries, timeouts are on the trace; "task timed out" is an
    ERROR span). It was not: every span of the trace is OK: the worker's CONSUMER span of the
    failure says `orchestrator.verdict: ok`, nothing says the task failed."""
    _, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant,
            {"message": "fail", "session_id": session, "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
    task_id = reply.json()["task_id"]
    redis = Redis.from_url(e2e_redis.url)
    try:
        action = await _chat_process(redis, task_id)
        failure = {
            "action_type": "execution.failed",
            "tenant_id": tenant,
            "session_id": session,
            "task_id": task_id,
            "attempt": action["attempt"],
            "trace_context": action["trace_context"],
            "error": "model overloaded",
            "code": "upstream_error",
            "retryable": False,
        }
        entry = (
            await redis.xadd(action["callback_queue"], {"action": json.dumps(failure)})
        ).decode()
    finally:
        await redis.aclose()
    answer = await events_until(ws, final_of(task_id))
    await ws.close()
    assert answer[-1]["type"] == "chat.error", answer[-1]
    message_trace = trace_id_of(action)

    def delivered(spans: list) -> bool:
        trace = [s for s in spans if s.trace_id == message_trace]
        return any(s.attributes.get("messaging.message.id") == entry for s in trace) and any(
            s.name == "websocket send" for s in trace
        )

    spans = await wait_for(receiver, delivered)
    trace = [s for s in spans if s.trace_id == message_trace]
    worker = [s for s in trace if s.attributes.get("messaging.message.id") == entry]
    assert worker, f"the worker's span of the failure is not on the trace: {short(trace)}"
    assert [s for s in trace if s.status_code == 2], (
        f"a failed task's trace without any error: {short(trace)}; the worker's span "
        f"{worker[0].attributes}, events {receiver.events.get(worker[0].span_id)}"
    )


async def test_a_socket_cancel_ends_the_run_as_cancelled_on_the_messages_trace(
    traced: tuple[LocalStack, Child, FullReceiver], e2e_redis: RedisServer
) -> None:
    """Guard (the existing test cancels over REST only): a message sent as a `chat.send`
    frame is one trace rooted at `WS chat.send`; cancelled by a `chat.cancel` frame, the
    executor's run on that trace ends with `orchestrator.outcome: cancelled`, and the cancel
    notice is a PRODUCER `send {aes}:cancel` naming the task."""
    _, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    frame = {
        "type": "chat.send",
        "data": {"message": "cancel me", "request_id": "r1",
                 "context": {"simulate": {"stall": True}}},
    }  # fmt: skip
    await ws.send(json.dumps(frame))
    status = await events_until(ws, lambda e: e["type"] == "chat.status")
    task_id = status[-1]["task_id"]

    def running(spans: list) -> bool:
        return any(s.kind == "PRODUCER" for s in of_task(spans, task_id))

    redis = Redis.from_url(e2e_redis.url)
    try:
        action = await _chat_process(redis, task_id)
        stream = keys.aes_stream(action["priority"])
        await wait_for(receiver, running)
        deadline = time.monotonic() + 10
        while not (await redis.xpending(stream, keys.AES_GROUP))["pending"]:
            assert time.monotonic() < deadline, "the executor never took the task"
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()
    await ws.send(json.dumps({"type": "chat.cancel", "data": {"task_id": task_id}}))
    answer = await events_until(ws, final_of(task_id))
    await ws.close()
    assert answer[-1]["type"] == "chat.cancelled", answer[-1]
    message_trace = trace_id_of(action)

    def ended(spans: list) -> bool:
        return any(
            s.service.endswith("executor") and s.kind == "CONSUMER" for s in of_task(spans, task_id)
        ) and any(s.name == f"send {keys.CANCEL_STREAM}" for s in of_task(spans, task_id))

    spans = await wait_for(receiver, ended)
    trace = receiver.trace(message_trace)
    root = [s for s in trace if not s.parent_id]
    assert [(s.kind, s.name) for s in root] == [("SERVER", "WS chat.send")], short(trace)
    run = next(s for s in trace if s.service.endswith("executor") and s.kind == "CONSUMER")
    assert run.attributes.get("orchestrator.outcome") == "cancelled", run.attributes
    notice = next(s for s in of_task(spans, task_id) if s.name == f"send {keys.CANCEL_STREAM}")
    assert notice.kind == "PRODUCER"
    assert notice.attributes["messaging.destination.name"] == keys.CANCEL_STREAM


async def test_aes_sends_with_the_actions_own_trace_context_are_on_the_messages_trace(
    traced: tuple[LocalStack, Child, FullReceiver], e2e_redis: RedisServer
) -> None:
    """Guard (the e2e tests use an AES that makes spans of its own): an AES without tracing
    copies the action's `trace_context` verbatim into a `websocket.send` and a
    `websocket.broadcast` (README: "Copy the action's `trace_context` ... to put it on the
    message's trace"). The send's worker CONSUMER, api CONSUMER and `websocket send` are on
    the message's trace under the api's PRODUCER; the broadcast's trace ends at the worker."""
    _, api, receiver = traced
    tenant, session, marker = unique("t"), unique("s"), unique("m")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant,
            {"message": "aes", "session_id": session, "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
    task_id = reply.json()["task_id"]
    redis = Redis.from_url(e2e_redis.url)
    try:
        action = await _chat_process(redis, task_id)
        ids = {}
        for kind in ("websocket.send", "websocket.broadcast"):
            callback = {
                "action_type": kind,
                "tenant_id": tenant,
                "session_id": session,
                "task_id": task_id,
                "trace_context": action["trace_context"],
                "message": {"marker": marker, "kind": kind},
            }
            ids[kind] = (
                await redis.xadd(action["callback_queue"], {"action": json.dumps(callback)})
            ).decode()
    finally:
        await redis.aclose()
    frames = await events_until(
        ws,
        lambda e: e["type"] == "message" and e["data"].get("kind") == "websocket.broadcast",
    )
    await ws.close()
    sent = next(
        f for f in frames if f["type"] == "message" and f["data"]["kind"] == "websocket.send"
    )
    message_trace = trace_id_of(action)

    def arrived(spans: list) -> bool:
        trace = [s for s in spans if s.trace_id == message_trace]
        return any(s.attributes.get("event.id") == sent["id"] for s in trace) and any(
            s.attributes.get("messaging.message.id") == ids["websocket.broadcast"] for s in trace
        )

    spans = await wait_for(receiver, arrived)
    trace = [s for s in spans if s.trace_id == message_trace]
    assert arrived(spans), short(trace)
    by_id = {s.span_id: s for s in trace}
    producer = next(s for s in trace if s.kind == "PRODUCER" and s.service.endswith("api"))
    for kind, entry in ids.items():
        worker = next(s for s in trace if s.attributes.get("messaging.message.id") == entry)
        assert (worker.kind, worker.parent_id) == ("CONSUMER", producer.span_id), kind
        assert worker.attributes["orchestrator.action_type"] == kind
    leaf = next(s for s in trace if s.attributes.get("event.id") == sent["id"])
    hop = by_id[leaf.parent_id]
    assert hop.name == f"process {keys.SESSION_CHANNEL_TEMPLATE}"
    assert by_id[hop.parent_id].attributes["messaging.message.id"] == ids["websocket.send"]
    channel = keys.tenant_channel(tenant)
    assert not [s for s in trace if s.attributes.get("messaging.destination.name") == channel]


async def test_a_fenced_off_answer_is_dropped_on_the_messages_trace(
    traced: tuple[LocalStack, Child, FullReceiver], e2e_redis: RedisServer
) -> None:
    """Guard (no tracing test covers fencing): README "fencing drops ... are on the trace".
    An AES fails attempt 1 (retryable), the task is retried as attempt 2, then attempt 1's
    late completion arrives with its `trace_context`: the worker's span of it is on the
    message's trace with the event `callback dropped` (reason `stale`)."""
    _, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant,
            {"message": "fence", "session_id": session, "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
    task_id = reply.json()["task_id"]
    redis = Redis.from_url(e2e_redis.url)
    try:
        action = await _chat_process(redis, task_id)
        common = {
            "tenant_id": tenant,
            "session_id": session,
            "task_id": task_id,
            "attempt": 1,
            "trace_context": action["trace_context"],
        }
        failed = {"action_type": "execution.failed", "error": "busy", "retryable": True}
        await redis.xadd(action["callback_queue"], {"action": json.dumps({**common, **failed})})
        await events_until(
            ws, lambda e: e["type"] == "chat.status" and e["data"].get("attempt") == 2
        )
        late = {"action_type": "execution.completed", "content": "too late"}
        entry = (
            await redis.xadd(action["callback_queue"], {"action": json.dumps({**common, **late})})
        ).decode()
    finally:
        await redis.aclose()
    await ws.close()
    message_trace = trace_id_of(action)
    spans = await wait_for(
        receiver,
        lambda spans: any(s.attributes.get("messaging.message.id") == entry for s in spans),
    )
    worker = [s for s in spans if s.attributes.get("messaging.message.id") == entry]
    assert worker, "the late answer made no span"
    assert worker[0].trace_id == message_trace, short(worker)
    assert ("callback dropped", {"reason": "stale"}) in [
        (name, {"reason": attributes.get("reason")})
        for name, attributes in receiver.events.get(worker[0].span_id, [])
    ], receiver.events.get(worker[0].span_id)

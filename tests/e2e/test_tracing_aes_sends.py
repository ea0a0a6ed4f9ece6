"""An AES's `websocket.send` and `websocket.broadcast` on the message's trace (DESIGN §7), with
real api, worker and executor processes, Valkey, and an OTLP sink.

The test plays the AES: its own tracer (exporting to the same sink as `test-aes`) continues the
`chat.process`'s context in a CONSUMER span and writes the callback inside a PRODUCER span,
whose context it copies into the callback's `trace_context`, as README "For AES teams" asks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.otlp_sink import ReceivedSpan, Receiver
from services.cli.stack import Child, LocalStack
from services.core import keys
from services.core.settings import load_settings
from tests.e2e.clients import connect, events_until, send, unique
from tests.e2e.test_tracing import ancestry
from tests.e2e.test_tracing_cases import _chat_process, wait_for

pytestmark = pytest.mark.e2e

AES = "test-aes"
_propagator = TraceContextTextMapPropagator()


@pytest.fixture(scope="module")
def aes_tracer(traced: tuple[LocalStack, Child, Receiver]) -> Iterator[Tracer]:
    """The test AES's tracer: each span is exported to the sink as it ends."""
    _, _, receiver = traced
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: AES}))
    exporter = OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test-aes")
    provider.shutdown()


def received(spans: list[ReceivedSpan], leaf: ReceivedSpan) -> bool:
    """Whether every parent of `leaf` is in (each process exports in batches of its own)."""
    by_id = {s.span_id: s for s in spans}
    span: ReceivedSpan | None = leaf
    while span is not None and span.parent_id:
        span = by_id.get(span.parent_id)
    return span is not None


def hops(chain: list[ReceivedSpan]) -> list[tuple[str, str, str]]:
    """A chain root first, as (process, kind, name)."""
    return [(s.service.rsplit("-", 1)[-1], s.kind, s.name) for s in reversed(chain)]


async def stalled_message(api: Child, redis: Redis, tenant: str, session: str) -> dict[str, Any]:
    """A message whose run stalls in the executor: its `chat.process` as the api added it (the
    action an AES copies `trace_context` from)."""
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant,
            {"message": "aes sends", "session_id": session,
             "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
    return await _chat_process(redis, reply.json()["task_id"])


async def aes_callback(
    redis: Redis, tracer: Tracer, action: dict[str, Any], callback: dict[str, Any]
) -> str:
    """Write `callback` as a traced AES does: in a PRODUCER span under the CONSUMER span of
    the action, its context copied into `trace_context`. Returns the producer's span id."""
    parent = _propagator.extract(action["trace_context"])
    stream = action["callback_queue"]
    with (
        tracer.start_as_current_span(
            f"process {keys.aes_stream(action['priority'])}", context=parent, kind=SpanKind.CONSUMER
        ),
        tracer.start_as_current_span(f"send {stream}", kind=SpanKind.PRODUCER) as producer,
    ):
        carrier: dict[str, str] = {}
        _propagator.inject(carrier)
        body = {
            "tenant_id": action["tenant_id"],
            "session_id": action["session_id"],
            "task_id": action["task_id"],
            "trace_context": carrier,
            **callback,
        }
        await redis.xadd(stream, {"action": json.dumps(body)})
    return format(producer.get_span_context().span_id, "016x")


def message_with(marker: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event["type"] == "message" and event["data"].get("marker") == marker


async def test_an_aes_websocket_send_is_on_the_message_trace(
    traced: tuple[LocalStack, Child, Receiver], e2e_redis: RedisServer, aes_tracer: Tracer
) -> None:
    """The worker dropped a `websocket.send`'s `trace_context`: the frame reached the socket
    on no trace at all, so an AES's messages were missing from the message's trace."""
    _, api, receiver = traced
    tenant, session, marker = unique("t"), unique("s"), unique("m")
    ws, _ = await connect(api.ws_url, tenant, session)
    redis = Redis.from_url(e2e_redis.url)
    try:
        action = await stalled_message(api, redis, tenant, session)
        producer = await aes_callback(
            redis,
            aes_tracer,
            action,
            {"action_type": "websocket.send", "message": {"marker": marker}},
        )
    finally:
        await redis.aclose()
    (*_, frame) = await events_until(ws, message_with(marker))
    await ws.close()

    def delivered(spans: list[ReceivedSpan]) -> bool:
        return any(
            s.attributes.get("event.id") == frame["id"] and received(spans, s) for s in spans
        )

    spans = await wait_for(receiver, delivered)
    message_trace = action["trace_context"]["traceparent"].split("-")[1]
    sent = next(s for s in spans if s.attributes.get("event.id") == frame["id"])
    assert sent.trace_id == message_trace
    trace = [s for s in spans if s.trace_id == message_trace]
    chain = hops(ancestry(trace, sent))
    assert chain[0][:2] == ("api", "SERVER"), chain
    assert chain[-5:] == [
        ("aes", "CONSUMER", f"process {keys.aes_stream(action['priority'])}"),
        ("aes", "PRODUCER", f"send {action['callback_queue']}"),
        ("worker", "CONSUMER", f"process {action['callback_queue']}"),
        ("api", "CONSUMER", f"process {keys.SESSION_CHANNEL_TEMPLATE}"),
        ("api", "INTERNAL", "websocket send"),
    ], chain
    worker = ancestry(trace, sent)[2]
    assert worker.parent_id == producer
    assert worker.attributes["orchestrator.action_type"] == "websocket.send"
    assert worker.attributes["orchestrator.verdict"] == "ok"


async def test_an_aes_websocket_broadcast_is_on_the_message_trace_up_to_the_worker(
    traced: tuple[LocalStack, Child, Receiver], e2e_redis: RedisServer, aes_tracer: Tracer
) -> None:
    """A tenant's `websocket.broadcast` reaching sockets on two api pods: the worker's span
    continues the AES's trace under a name that does not name the tenant. The trace ends
    there: the tenant channel carries the frame alone (an api of the version before would
    forward a trace prefix to its clients during a rolling upgrade), so no api span of the
    tenant's channel appears, and every socket gets the frame. Before, the broadcast was on
    no trace at all."""
    stack, api, receiver = traced
    other = stack.start_api()
    try:
        stack.wait_ready(other)
        tenant, marker = unique("t"), unique("m")
        sessions = [unique("s"), unique("s"), unique("s")]
        sockets = [
            (await connect(pod.ws_url, tenant, session))[0]
            for pod, session in zip((api, api, other), sessions, strict=True)
        ]
        redis = Redis.from_url(e2e_redis.url)
        try:
            action = await stalled_message(api, redis, tenant, sessions[0])
            producer = await aes_callback(
                redis,
                aes_tracer,
                action,
                {"action_type": "websocket.broadcast", "message": {"marker": marker}},
            )
        finally:
            await redis.aclose()
        for ws in sockets:
            await events_until(ws, message_with(marker))
            await ws.close()
    finally:
        stack.stop_child(other)

    def worker_span(spans: list[ReceivedSpan]) -> bool:
        return any(s.parent_id == producer for s in spans)

    spans = await wait_for(receiver, worker_span)
    message_trace = action["trace_context"]["traceparent"].split("-")[1]
    trace = [s for s in spans if s.trace_id == message_trace]
    worker = next(s for s in trace if s.parent_id == producer)
    assert hops([worker]) == [("worker", "CONSUMER", f"process {action['callback_queue']}")], hops(
        [worker]
    )
    assert worker.attributes["orchestrator.action_type"] == "websocket.broadcast"
    channel = keys.tenant_channel(tenant)
    assert not [s for s in trace if s.attributes.get("messaging.destination.name") == channel]
    names = {s.name for s in trace}
    assert not any(tenant in name for name in names), f"span names name the tenant: {names}"


async def test_a_websocket_send_without_a_valid_trace_context_makes_no_span(
    traced: tuple[LocalStack, Child, Receiver], e2e_redis: RedisServer, aes_tracer: Tracer
) -> None:
    """No `trace_context` (the delivery benchmark's `{}`), or one that holds no valid W3C
    context, costs no span anywhere (not a root span of a trace of its own either). A traced
    send written after them is the barrier: once its spans are in, the worker and the api
    have exported everything they made before it."""
    _, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    stream = keys.callback_stream(
        keys.partition_of(tenant, session, load_settings().callback_partitions)
    )
    contexts: list[dict[str, str]] = [
        {},
        {"traceparent": "not a traceparent"},
        {"traceparent": "00-00000000000000000000000000000000-0000000000000000-01"},
    ]
    redis = Redis.from_url(e2e_redis.url)

    async def websocket_send(context: dict[str, str], marker: str) -> str:
        callback = {
            "action_type": "websocket.send",
            "tenant_id": tenant,
            "session_id": session,
            "trace_context": context,
            "message": {"marker": marker},
        }
        return (await redis.xadd(stream, {"action": json.dumps(callback)})).decode()

    try:
        untraced = [
            await websocket_send(context, f"untraced-{i}") for i, context in enumerate(contexts)
        ]
        with aes_tracer.start_as_current_span("barrier", kind=SpanKind.PRODUCER):
            carrier: dict[str, str] = {}
            _propagator.inject(carrier)
            await websocket_send(carrier, "traced")
    finally:
        await redis.aclose()
    frames = await events_until(ws, message_with("traced"))
    await ws.close()
    plain = [f["id"] for f in frames if str(f["data"].get("marker", "")).startswith("untraced")]
    assert len(plain) == len(contexts)
    traced_id = frames[-1]["id"]

    def barrier(spans: list[ReceivedSpan]) -> bool:
        return any(s.attributes.get("event.id") == traced_id for s in spans) and any(
            s.service.endswith("worker") and s.attributes.get("orchestrator.action_type")
            == "websocket.send" and s.attributes.get("messaging.destination.name") == stream
            for s in spans
        )  # fmt: skip

    spans = await wait_for(receiver, barrier)
    made = [
        (s.service, s.name)
        for s in spans
        if s.attributes.get("messaging.message.id") in untraced
        or s.attributes.get("event.id") in plain
    ]
    assert not made, f"spans of untraced sends: {made}"

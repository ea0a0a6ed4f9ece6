"""One trace per chat message across every process, exported over real OTLP/HTTP."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from services.cli.embedded import RedisServer
from services.cli.otlp_sink import ReceivedSpan, Receiver
from services.cli.stack import Child, LocalStack
from tests.e2e.clients import (
    SECRET,
    auth,
    connect,
    events_until,
    final_of,
    send,
    token,
    unique,
)

pytestmark = pytest.mark.e2e


async def trace_of(receiver: Receiver, task_id: str, until: set[str]) -> list[ReceivedSpan]:
    """The spans of the task's trace, once every service in `until` has exported some."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with receiver.lock:
            marked = [
                s for s in receiver.spans if s.attributes.get("orchestrator.task_id") == task_id
            ]
        if marked:
            spans = receiver.trace(marked[0].trace_id)
            if until <= {s.service for s in spans}:
                return spans
        await asyncio.sleep(0.05)
    raise AssertionError(f"no complete trace for {task_id}")


async def answered(
    api: Child,
    receiver: Receiver,
    tenant: str,
    session: str,
    message: str,
    bearer: str | None = None,
) -> tuple[str, list[ReceivedSpan]]:
    """A plain message sent and answered on the session's socket: its task id and the spans of
    its trace the api has exported so far."""
    ws, _ = await connect(api.ws_url, tenant, session, bearer=bearer)
    async with httpx.AsyncClient() as http:
        reply = await send(http, api.url, tenant, {"message": message, "session_id": session})
    task_id = reply.json()["task_id"]
    await events_until(ws, final_of(task_id))
    await ws.close()
    return task_id, await trace_of(receiver, task_id, {"agent-orchestrator-api"})


def complete(spans: list[ReceivedSpan]) -> bool:
    """Every parent received, and the worker's span, the stream span and the socket send."""
    ids = {s.span_id for s in spans}
    return (
        all(not s.parent_id or s.parent_id in ids for s in spans)
        and any(s.kind == "CONSUMER" and s.service.endswith("worker") for s in spans)
        and any(s.attributes.get("orchestrator.stream") for s in spans)
        and any(s.name == "websocket send" for s in spans)
    )


def ancestry(spans: list[ReceivedSpan], leaf: ReceivedSpan) -> list[ReceivedSpan]:
    by_id = {s.span_id: s for s in spans}
    chain = [leaf]
    while chain[-1].parent_id:
        parent = by_id.get(chain[-1].parent_id)
        assert parent is not None, f"missing parent of {chain[-1].name} in {chain[-1].service}"
        chain.append(parent)
    return chain


async def test_a_streamed_chat_is_one_trace_from_http_to_the_socket(
    traced: tuple[LocalStack, Child, Receiver],
) -> None:
    _, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant, {"message": "trace me", "stream": True, "session_id": session}
        )
    task_id = reply.json()["task_id"]
    await events_until(ws, final_of(task_id))
    await ws.close()
    services = {
        "agent-orchestrator-api",
        "agent-orchestrator-worker",
        "agent-orchestrator-executor",
    }
    spans = await trace_of(receiver, task_id, services)
    deadline = time.monotonic() + 15
    while not complete(spans):  # each process exports in its own batches: wait for them all
        assert time.monotonic() < deadline, "the trace never became complete"
        await asyncio.sleep(0.05)
        spans = receiver.trace(spans[0].trace_id)

    server = [s for s in spans if s.kind == "SERVER" and s.service == "agent-orchestrator-api"]
    assert server, "the HTTP request is the root"
    sends = [s for s in spans if s.kind == "PRODUCER"]
    processes = [s for s in spans if s.kind == "CONSUMER"]
    aes_send = next(s for s in sends if s.name.startswith("send {aes}:actions:"))
    assert aes_send.service == "agent-orchestrator-api"
    executor = next(s for s in processes if s.service == "agent-orchestrator-executor")
    worker = next(s for s in processes if s.service == "agent-orchestrator-worker")
    for span in (executor, worker):
        assert span.attributes["messaging.system"] == "redis"
        assert span.attributes["messaging.destination.name"] in span.name
        assert span.attributes["messaging.message.id"]
        assert span.attributes["messaging.consumer.group.name"] in ("aes", "workers")
    assert worker.attributes["messaging.batch.message_count"] >= 1
    chain = ancestry(spans, worker)
    names = [(s.service.rsplit("-", 1)[-1], s.kind) for s in reversed(chain)]
    assert names[0] == ("api", "SERVER")
    assert ("api", "PRODUCER") in names
    assert ("executor", "CONSUMER") in names
    assert ("executor", "PRODUCER") in names
    assert names[-1] == ("worker", "CONSUMER")
    delivered = next(s for s in spans if s.name == "websocket send")
    path = [(s.service.rsplit("-", 1)[-1], s.kind) for s in reversed(ancestry(spans, delivered))]
    assert path[0] == ("api", "SERVER")
    assert ("worker", "CONSUMER") in path
    assert path[-2:] == [("api", "CONSUMER"), ("api", "INTERNAL")], "delivery hop, then send"
    stream = [s for s in sends if s.attributes.get("orchestrator.stream")]
    assert len(stream) == 1, "a stream of chunks is one span, not one per chunk"
    assert stream[0].attributes["messaging.batch.message_count"] > 1
    secret = token(tenant)
    with receiver.lock:
        assert all(secret not in repr(s.attributes) for s in receiver.spans), (
            "no span holds a token"
        )


async def test_retries_and_timeouts_are_visible_on_the_trace(
    traced: tuple[LocalStack, Child, Receiver], e2e_redis: RedisServer
) -> None:
    from redis.asyncio import Redis

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
        retried = await send(
            http, api.url, tenant,
            {"message": "flaky", "session_id": session,
             "context": {"simulate": {"fail_attempts": 1}}},
        )  # fmt: skip
        stalled = await send(
            http, api.url, impatient,
            {"message": "stuck", "session_id": session, "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
    answer = await events_until(ws, final_of(retried.json()["task_id"]))
    assert answer[-1]["type"] == "chat.response"
    await events_until(ws_impatient, final_of(stalled.json()["task_id"]), timeout=10)
    await ws.close()
    await ws_impatient.close()

    services = {
        "agent-orchestrator-api",
        "agent-orchestrator-worker",
        "agent-orchestrator-executor",
    }
    deadline = time.monotonic() + 10
    while True:  # spans of the second attempt arrive with the exporters' next batch
        spans = await trace_of(receiver, retried.json()["task_id"], services)
        attempts = {s.attributes.get("orchestrator.attempt") for s in spans if s.kind == "CONSUMER"}
        if {1, 2} <= attempts or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert {1, 2} <= attempts
    assert any("retry scheduled" in s.events for s in spans)
    assert any(s.attributes.get("orchestrator.retry") for s in spans if s.kind == "PRODUCER")
    assert any(s.status_code == 2 for s in spans), "the failed attempt is an error"

    deadline = time.monotonic() + 10
    while True:
        spans = await trace_of(receiver, stalled.json()["task_id"], {"agent-orchestrator-api"})
        timed_out = [s for s in spans if s.name == "task timed out"]
        if timed_out:
            break
        assert time.monotonic() < deadline, "the timeout never reached the trace"
        await asyncio.sleep(0.05)
    assert timed_out[0].status_code == 2
    assert timed_out[0].service == "agent-orchestrator-worker"


async def test_log_lines_are_json_with_the_trace_id_and_never_hold_a_secret(
    traced: tuple[LocalStack, Child, Receiver],
) -> None:
    stack, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    bearer = token(tenant)
    task_id, spans = await answered(api, receiver, tenant, session, "log me", bearer=bearer)

    deadline = time.monotonic() + 10
    while True:
        lines = [
            line
            for child in stack.children
            if child.log_path is not None
            # Complete lines only: a process may be writing its next line right now.
            for line in child.log_path.read_text().split("\n")[:-1]
            if line.strip()
        ]
        accepted = [line for line in lines if task_id in line and "message accepted" in line]
        if accepted or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "service", "msg"} <= set(record) for record in records)
    mine = json.loads(accepted[0])
    assert mine["trace_id"] == spans[0].trace_id
    assert (mine["tenant_id"], mine["session_id"]) == (tenant, session)
    everything = "\n".join(lines)
    assert bearer not in everything
    assert SECRET not in everything
    assert "log me" not in everything, "message bodies are not logged"


def lag_exemplars(port: int | None, hop: str) -> set[str]:
    """The trace ids on `hop`'s delivery-lag buckets, as Prometheus scrapes them (OpenMetrics,
    the format that carries exemplars)."""
    reply = httpx.get(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        timeout=5,
    )
    found: set[str] = set()
    for family in openmetrics_families(reply.text):
        if family.name != "orchestrator_delivery_lag_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("hop") == hop and sample.exemplar is not None:
                found.add(sample.exemplar.labels["trace_id"])
    return found


async def test_a_traced_answer_leaves_its_trace_on_the_delivery_lag_of_both_hops(
    traced: tuple[LocalStack, Child, Receiver],
) -> None:
    """A slow delivery on the dashboard opens its trace: the worker's and the api's lag
    buckets carry the trace id of the answer they timed."""
    stack, api, receiver = traced
    worker = next(child for child in stack.children if child.role == "worker")
    _, spans = await answered(api, receiver, unique("t"), unique("s"), "lag")
    trace_id = spans[0].trace_id
    assert trace_id in lag_exemplars(worker.metrics_port, "worker")
    assert trace_id in lag_exemplars(api.metrics_port, "api")


def exemplar_traces(port: int | None, family_name: str) -> set[str]:
    """The trace ids on a histogram's buckets, as Prometheus scrapes them (OpenMetrics)."""
    reply = httpx.get(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        timeout=5,
    )
    return {
        sample.exemplar.labels["trace_id"]
        for family in openmetrics_families(reply.text)
        if family.name == family_name
        for sample in family.samples
        if sample.exemplar is not None
    }


async def test_a_streamed_answer_leaves_its_trace_on_first_chunk_and_queue_wait(
    traced: tuple[LocalStack, Child, Receiver], e2e_redis: RedisServer
) -> None:
    """docs/kubernetes.md: each dot of the latency panels carries the trace id of a sampled
    request. Chunks get no span, so the first chunk's sample had no exemplar ("Time to first
    chunk" showed none while "Answer time" did), and the executor timed the queue wait with
    none either."""
    from redis.asyncio import Redis

    from services.core.quotas import QuotaStore
    from services.core.settings import load_settings

    stack, api, receiver = traced
    worker = next(child for child in stack.children if child.role == "worker")
    tenant, session = unique("t"), unique("s")
    redis = Redis.from_url(e2e_redis.url)
    await QuotaStore(redis, load_settings()).set(tenant, "pro")  # a tier that streams
    await redis.aclose()
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant, {"message": "first chunk", "stream": True, "session_id": session}
        )
    task_id = reply.json()["task_id"]
    events = await events_until(ws, final_of(task_id))
    await ws.close()
    assert any(e["type"] == "chat.chunk" for e in events), events
    spans = await trace_of(receiver, task_id, {"agent-orchestrator-api"})
    executor = next(child for child in stack.children if child.role == "executor")
    first_chunk = "orchestrator_time_to_first_chunk_seconds"
    assert spans[0].trace_id in exemplar_traces(worker.metrics_port, first_chunk)
    queue_wait = "orchestrator_queue_wait_seconds"
    assert spans[0].trace_id in exemplar_traces(executor.metrics_port, queue_wait)


async def test_a_frame_type_no_client_action_has_is_not_a_span_name(
    traced: tuple[LocalStack, Child, Receiver],
) -> None:
    """The span of a frame was named `WS <type>` before the type was checked: any client
    could mint span names of any content and size (up to MAX_FRAME_BYTES each), against the
    low cardinality span names need (OTel), filling the span queue and the backend."""
    _, api, receiver = traced
    marker = unique("m")
    ws, _ = await connect(api.ws_url, unique("sp"), unique("s"))
    await ws.send(json.dumps({"type": marker + "x" * 200_000, "data": {}}))
    error = json.loads(await ws.recv())
    await ws.close()
    assert error["type"] == "error"
    assert len(error["data"]["message"]) < 200, "the unknown type echoed in full"
    deadline = time.monotonic() + 15
    while True:
        with receiver.lock:
            names = {s.name for s in receiver.spans if s.name.startswith("WS ")}
        if "WS unknown" in names or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert "WS unknown" in names, sorted(n[:40] for n in names)
    assert not any(marker in name for name in names)


async def spans_named(receiver: Receiver, marker: str, count: int) -> list[ReceivedSpan]:
    """The exported server spans of requests whose path holds `marker`, once `count` of them
    arrived (20 s)."""
    deadline = time.monotonic() + 20
    while True:
        with receiver.lock:
            found = [s for s in receiver.spans if marker in str(s.attributes.get("http.target"))]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def test_a_query_token_never_reaches_an_exported_span(
    traced: tuple[LocalStack, Child, Receiver],
) -> None:
    """The socket URL fetched as plain HTTP (a proxy that drops `Upgrade`, a link opened in a
    browser) and a REST call with `?token=` as on the socket were exported with the whole
    bearer token in `http.url` and `http.target`: whoever reads traces could act as the tenant
    until the token expired."""
    _, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    bearer = token(tenant)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        await http.get(f"/ws/{tenant}/{session}", params={"token": bearer})
        await http.get(f"/api/sessions/{session}/messages", params={"token": bearer})
    spans = await spans_named(receiver, session, 2)
    assert spans, "no span exported for the two requests"
    leaked = [
        (s.name, key)
        for s in spans
        for key, value in s.attributes.items()
        if bearer.split(".")[2] in json.dumps(value, default=str)
    ]
    assert not leaked, f"the bearer token is in exported span attributes: {leaked}"


async def test_rest_span_names_and_routes_are_templates_not_client_text(
    traced: tuple[LocalStack, Child, Receiver],
) -> None:
    """REST spans were named after the raw path (Litestar's default): every task id a client
    asks about a new span name, and a path of the client's choosing (a token pasted in it)
    a span name and `http.route` as it is. OTel asks for the route template."""
    _, api, receiver = traced
    tenant = unique("t")
    task_id, junk = unique("task"), unique("no-such-route")
    async with httpx.AsyncClient(base_url=api.url, timeout=10, headers=auth(tenant)) as http:
        await http.get(f"/api/chat/tasks/{task_id}")
        await http.get(f"/{junk}")
    spans = await spans_named(receiver, task_id, 1) + await spans_named(receiver, junk, 1)
    assert spans, "no span exported for the two requests"
    raw = [
        (s.name, s.attributes.get("http.route"))
        for s in spans
        if task_id in s.name + str(s.attributes.get("http.route"))
        or junk in s.name + str(s.attributes.get("http.route"))
    ]
    assert not raw, f"client text in span names / http.route (not templates): {raw}"

"""Guards over every span a mixed load exports (README "Traces"/"Logs", DESIGN §7): names of
OTel messaging form (`send <destination>` PRODUCER, `process <destination or template>`
CONSUMER), bounded span names, and no token, signing secret or message body in any span
attribute or span event attribute (the e2e tests look at attributes only, and at a few spans)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from services.cli.stack import Child, LocalStack
from tests.e2e.clients import SECRET, connect, events_until, final_of, send, token, unique
from tests.e2e.traces.conftest import FullReceiver
from tests.e2e.traces.helpers import of_task, wait_for

pytestmark = pytest.mark.e2e

BOUNDED = re.compile(
    r"^(send|process) \{[a-z]+(:[A-Z]+:[A-Z]+)?(:\d+)?\}:[a-z]+(:(high|normal|low))?$"
    r"|^(GET|POST|DELETE|OPTIONS|HTTP)( /[a-z/{}_]*)?$"
    r"|^WS (chat\.send|chat\.cancel|unknown)$"
    r"|^(websocket send|task timed out)$"
)


async def test_spans_follow_messaging_names_and_hold_no_secret_or_body(
    traced: tuple[LocalStack, Child, FullReceiver],
) -> None:
    """Guard: a streamed REST send, a socket `chat.send`, a retried one and a cancelled one,
    each with a body marker and a bearer token: every PRODUCER is `send <its
    messaging.destination.name>`, every CONSUMER `process <destination or its template>`,
    every span name is one of a bounded set (no client text, ids or tenant names), and no
    attribute or event attribute holds the token, the secret or a message body."""
    _, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    bearer = token(tenant)
    markers = [unique("body") for _ in range(4)]
    ws, _ = await connect(api.ws_url, tenant, session, bearer=bearer)
    async with httpx.AsyncClient() as http:
        streamed = (await send(
            http, api.url, tenant,
            {"message": markers[0], "stream": True, "session_id": session},
        )).json()["task_id"]  # fmt: skip
        retried = (await send(
            http, api.url, tenant,
            {"message": markers[1], "session_id": session,
             "context": {"simulate": {"fail_attempts": 1}}},
        )).json()["task_id"]  # fmt: skip
        await events_until(ws, final_of(streamed))
        await events_until(ws, final_of(retried))
        await ws.send(json.dumps({"type": "chat.send", "data": {"message": markers[2]}}))
        status = await events_until(ws, lambda e: e["type"] == "chat.status")
        await events_until(ws, final_of(status[-1]["task_id"]))
        stalled = (await send(
            http, api.url, tenant,
            {"message": markers[3], "session_id": session,
             "context": {"simulate": {"stall": True}}},
        )).json()["task_id"]  # fmt: skip
        await ws.send(json.dumps({"type": "chat.cancel", "data": {"task_id": stalled}}))
        await events_until(ws, final_of(stalled))
    await ws.close()
    tasks = [streamed, retried, status[-1]["task_id"], stalled]

    def all_in(spans: list) -> bool:
        return all(
            any(s.service.endswith("worker") for s in spans if s.trace_id in
                {t.trace_id for t in of_task(spans, task)})
            for task in tasks[:3]
        )  # fmt: skip

    spans = await wait_for(receiver, all_in)
    assert all_in(spans), "the traces never arrived"
    wrong = []
    for s in spans:
        destination = s.attributes.get("messaging.destination.name")
        if s.kind == "PRODUCER":
            if (
                s.name != f"send {destination}"
                or s.attributes.get("messaging.operation.type") != "send"
                or s.attributes.get("messaging.system") != "redis"
            ):
                wrong.append((s.service, s.kind, s.name, destination))
        elif s.kind == "CONSUMER":
            shown = s.attributes.get("messaging.destination.template") or destination
            if (
                s.name != f"process {shown}"
                or s.attributes.get("messaging.operation.type") != "process"
            ):
                wrong.append((s.service, s.kind, s.name, destination))
    assert not wrong, wrong
    unbounded = sorted({s.name[:80] for s in spans if not BOUNDED.match(s.name)})
    assert not unbounded, unbounded
    secrets = [bearer.split(".")[2], SECRET, *markers]
    with receiver.lock:
        texts = [(s.name, json.dumps(s.attributes, default=str)) for s in receiver.spans] + [
            (name, json.dumps(attributes, default=str))
            for events in receiver.events.values()
            for name, attributes in events
        ]
    leaked = [(where, secret[:12]) for where, text in texts for secret in secrets if secret in text]
    assert not leaked, leaked


async def test_the_accepted_line_names_a_span_of_the_messages_trace(
    traced: tuple[LocalStack, Child, FullReceiver],
) -> None:
    """Guard (existing tests compare `trace_id` only): README "Logs" lines carry the
    `trace_id`/`span_id` of the span they were written in; the api's `message accepted` line
    of a socket `chat.send` names the message's trace and a span exported on it."""
    from tests.e2e.traces.helpers import wait_for_log

    stack, api, receiver = traced
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    await ws.send(json.dumps({"type": "chat.send", "data": {"message": "log line"}}))
    status = await events_until(ws, lambda e: e["type"] == "chat.status")
    task_id = status[-1]["task_id"]
    await events_until(ws, final_of(task_id))
    await ws.close()
    lines = await wait_for_log(
        stack, lambda r: r.get("task_id") == task_id and r.get("msg") == "message accepted"
    )
    assert lines, "no accepted line"
    line = lines[0]
    spans = await wait_for(
        receiver, lambda spans: any(s.span_id == line.get("span_id") for s in spans)
    )
    producer = next(s for s in of_task(spans, task_id) if s.kind == "PRODUCER")
    assert line.get("trace_id") == producer.trace_id, line
    assert any(
        s.span_id == line.get("span_id") and s.trace_id == producer.trace_id for s in spans
    ), line

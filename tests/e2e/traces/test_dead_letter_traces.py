"""README "Traces": "Retries (`attempt`, `retry scheduled`), fencing drops, timeouts and dead
letters are on the trace"; README "Logs": lines carry the `trace_id`/`span_id` of the span
they were written in. An AES's malformed completion, written as the contract asks (the
action's `trace_context` and `attempt` copied), with real api, worker, executor, Valkey and
an OTLP sink."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.test_tracing_cases import _chat_process
from tests.e2e.traces.conftest import FullReceiver
from tests.e2e.traces.helpers import of_task, short, trace_id_of, wait_for, wait_for_log

pytestmark = pytest.mark.e2e


async def malformed_answer(
    api: Child, e2e_redis: RedisServer, marker: str
) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """A stalled message answered by a completion with a negative token count (malformed:
    dead-lettered, the task failed at once with `malformed_answer`). Returns its `chat.process`, the
    callback's stream entry id and the events the socket got."""
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant,
            {"message": "dead letter", "session_id": session,
             "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
    task_id = reply.json()["task_id"]
    redis = Redis.from_url(e2e_redis.url)
    try:
        action = await _chat_process(redis, task_id)
        answer = {
            "action_type": "execution.completed",
            "tenant_id": tenant,
            "session_id": session,
            "task_id": task_id,
            "attempt": action["attempt"],
            "trace_context": action["trace_context"],
            "content": marker,
            "usage": {"input_tokens": -1},  # below 0: malformed
        }
        entry = (
            await redis.xadd(action["callback_queue"], {"action": json.dumps(answer)})
        ).decode()
    finally:
        await redis.aclose()
    events = await events_until(ws, final_of(task_id))
    await ws.close()
    return action, entry, events


async def test_a_dead_lettered_answer_is_on_the_messages_trace(
    traced: tuple[LocalStack, Child, FullReceiver], e2e_redis: RedisServer
) -> None:
    """An SRE opens the trace of a message whose answer was malformed and expects the dead
    letter on it (README: "dead letters are on the trace"), as an error. The worker's
    `dead-lettered` span (error.type `dead_letter`) was the root of a trace of its own, with no
    `orchestrator.task_id`: the message's trace showed the task failing `malformed_answer` but
    not the dead letter, and the dead letter's trace cannot be found from the message."""
    _, api, receiver = traced
    action, entry, events = await malformed_answer(api, e2e_redis, unique("body"))
    assert events[-1]["type"] == "chat.error", events[-1]
    assert events[-1]["data"]["code"] == "malformed_answer", events[-1]

    def dead(spans: list) -> bool:
        return any(
            s.attributes.get("error.type") == "dead_letter"
            and s.attributes.get("messaging.message.id") == entry
            for s in spans
        )

    spans = await wait_for(receiver, dead)
    dead_spans = [
        s
        for s in spans
        if s.attributes.get("error.type") == "dead_letter"
        and s.attributes.get("messaging.message.id") == entry
    ]
    assert dead_spans, "no dead-letter span exported at all"
    message_trace = trace_id_of(action)
    on_trace = receiver.trace(message_trace)
    assert all(s.trace_id == message_trace for s in dead_spans), (
        f"the dead letter's span is not on the message's trace {message_trace[:8]}: "
        f"{short(dead_spans)} (parent {dead_spans[0].parent_id or 'none'}, attributes "
        f"{sorted(dead_spans[0].attributes)}); the message's trace holds {short(on_trace)}"
    )
    assert dead_spans[0].status_code == 2


async def test_the_dead_letter_log_line_carries_the_messages_trace_id(
    traced: tuple[LocalStack, Child, FullReceiver], e2e_redis: RedisServer
) -> None:
    """README "Logs": lines carry `trace_id`/`span_id` and `task_id` where known, so the
    worker's warning for a task's dead-lettered answer leads to the message's trace. Its
    `dead-lettered entry` line carried the trace id of a fresh root span instead (and no
    `task_id`): searching the logs by the message's trace id or task id does not find it."""
    stack, api, _ = traced
    action, entry, _ = await malformed_answer(api, e2e_redis, unique("body"))
    lines = await wait_for_log(
        stack, lambda r: r.get("msg") == "dead-lettered entry" and r.get("entry_id") == entry
    )
    assert lines, "no dead-letter log line"
    line = lines[0]
    seen = (line.get("trace_id"), line.get("task_id"))
    assert seen == (trace_id_of(action), action["task_id"]), (
        f"the worker's dead-letter line: trace_id {line.get('trace_id')}, task_id "
        f"{line.get('task_id')}; the message's trace {trace_id_of(action)}, task "
        f"{action['task_id']}"
    )


async def test_a_dead_lettered_answer_leaves_no_body_in_spans_or_logs(
    traced: tuple[LocalStack, Child, FullReceiver], e2e_redis: RedisServer
) -> None:
    """Guard (no existing test looks at event attributes or dead-letter lines): the answer's
    text of a dead-lettered completion appears in no span attribute, no span event's
    attribute and no log line (README: "message bodies are never logged")."""
    stack, api, receiver = traced
    marker = unique("body")
    action, entry, _ = await malformed_answer(api, e2e_redis, marker)
    spans = await wait_for(
        receiver,
        lambda spans: any(s.attributes.get("messaging.message.id") == entry for s in spans),
    )
    await wait_for_log(stack, lambda r: r.get("entry_id") == entry)
    with receiver.lock:
        leaks = [
            (s.name, "attributes") for s in spans if marker in json.dumps(s.attributes, default=str)
        ] + [
            (span_id, name)
            for span_id, events in receiver.events.items()
            for name, attributes in events
            if marker in json.dumps(attributes, default=str)
        ]
    assert not leaks, leaks
    assert of_task(spans, action["task_id"])
    logs = "\n".join(
        child.log_path.read_text() for child in stack.children if child.log_path is not None
    )
    assert marker not in logs

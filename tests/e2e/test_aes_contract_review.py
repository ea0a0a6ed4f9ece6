"""An AES team's view of the contract (README "For AES teams", "Redis keys", "Delivery
guarantees", "Reliability"; schemas/; DESIGN §4), with the AES of tests/e2e/external_aes.py against
real api and worker processes and no reference executor."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import jsonschema
import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from services.core.deadletters import list_dead_letters
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import Event, auth, connect, events_until, final_of, unique
from tests.e2e.conftest import new_stack
from tests.e2e.external_aes import CANCEL, DLQ, STREAMS, Aes
from tests.e2e.test_external_aes import aes_redis, aes_stack, client_redis, start_task, task_state

pytestmark = pytest.mark.e2e

__all__ = ["aes_redis", "aes_stack"]  # fixtures used here

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        json.loads((SCHEMAS / f"{name}.json").read_text()),
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )


@pytest_asyncio.fixture
async def redis(aes_stack: tuple[LocalStack, Child]) -> AsyncIterator[Redis]:
    client = client_redis(aes_stack[0])
    yield client
    await client.aclose()


class Retried(NamedTuple):
    """A task in its second attempt, the AES holding its action."""

    aes: Aes
    ws: Any
    tenant: str
    session: str
    task_id: str
    stream: str
    entry: str
    action: dict[str, Any]


async def in_second_attempt(api: Child, aes: Aes) -> Retried:
    """A task whose first attempt the AES answered retryable; its second attempt taken."""
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session)
    stream, entry, first = await aes.take(task_id, attempt=1)
    await aes.answer(first, {"action_type": "execution.failed", "error": "x", "retryable": True})
    await aes.ack(stream, entry)
    stream, entry, second = await aes.take(task_id, attempt=2)
    return Retried(aes, ws, tenant, session, task_id, stream, entry, second)


async def marker(aes: Aes, action: dict[str, Any], ws: Any, n: int) -> list[Event]:
    """A websocket.send after everything written so far on the partition: once it arrives,
    every earlier callback of the session was applied (one partition, in stream order)."""
    await aes.raw(
        action["callback_queue"],
        {
            "action_type": "websocket.send",
            "tenant_id": action["tenant_id"],
            "session_id": action["session_id"],
            "message": {"marker": n},
        },
    )
    return await events_until(
        ws, lambda e: e["type"] == "message" and e["data"].get("marker") == n, timeout=10
    )


def chunks(events: list[Event], task_id: str) -> list[tuple[int, str]]:
    return [
        (e["data"]["seq"], e["data"]["delta"])
        for e in events
        if e["type"] == "chat.chunk" and e.get("task_id") == task_id
    ]


@pytest.mark.parametrize(
    ("tier", "priority"), [("free", "low"), ("pro", "normal"), ("enterprise", "high")]
)
async def test_chat_process_envelope_stream_and_names(
    aes_stack: tuple[LocalStack, Child], redis: Redis, tier: str, priority: str
) -> None:
    """README: one field `action`; chat.process on `{aes}:actions:<priority>` (the tier's
    priority); its JSON valid under schemas/chat.process.json; callback_queue a partition
    stream `{cb:N}:callbacks`."""
    _, api = aes_stack
    tenant, session = unique("t"), unique("s")
    await QuotaStore(redis, load_settings()).set(tenant, tier, {})
    aes = Aes(redis, "aes-envelope")
    await aes.ensure_group()
    task_id = await start_task(api, tenant, session, stream=tier != "free")
    stream, entry, fields, action = await aes.take_entry(task_id)
    await aes.ack(stream, entry)
    assert list(fields) == [b"action"], fields
    assert stream == f"{{aes}}:actions:{priority}", (stream, action)
    assert action["priority"] == priority, action
    schema("chat.process").validate(action)
    assert action["action_type"] == "chat.process"
    assert (action["tenant_id"], action["session_id"], action["task_id"]) == (
        tenant,
        session,
        task_id,
    )
    assert action["attempt"] == 1
    assert re.fullmatch(r"\{cb:\d+\}:callbacks", action["callback_queue"]), action
    assert isinstance(action["trace_context"], dict), action  # {} untraced (no OTEL here)
    assert action["deadline"] > action["created_at"], action


async def test_retryable_failure_fences_the_old_attempt(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README Reliability: a retryable execution.failed requeues the task (chat.status queued,
    attempt 2, retry_in_ms), the action comes again on the same priority stream with attempt 2,
    action_id `<task_id>-a2`, the same callback_queue and deadline; callbacks of attempt 1
    written after are dropped, attempt 2's chunks start at seq 1 and complete the task."""
    _, api = aes_stack
    aes = Aes(redis, "aes-retry")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session)
    stream1, entry1, first = await aes.take(task_id, attempt=1)
    await aes.answer(first, {"action_type": "execution.chunk", "seq": 1, "delta": "old "})
    await aes.answer(
        first,
        {"action_type": "execution.failed", "error": "model overloaded", "code": "overloaded",
         "retryable": True},
    )  # fmt: skip
    await aes.ack(stream1, entry1)
    stream2, entry2, second = await aes.take(task_id, attempt=2)
    # a stale instance still answering attempt 1
    await aes.answer(first, {"action_type": "execution.chunk", "seq": 2, "delta": "stale "})
    await aes.answer(first, {"action_type": "execution.completed", "content": "stale answer"})
    await aes.answer(second, {"action_type": "execution.chunk", "seq": 1, "delta": "new"})
    await aes.answer(second, {"action_type": "execution.completed", "content": "new"})
    await aes.ack(stream2, entry2)
    events = await events_until(ws, final_of(task_id))
    await ws.close()
    assert stream2 == stream1
    assert second["action_id"] == f"{task_id}-a2", second
    assert second["callback_queue"] == first["callback_queue"]
    assert second["deadline"] == first["deadline"]
    statuses = [e["data"] for e in events if e["type"] == "chat.status"]
    assert any(s.get("attempt") == 2 and s.get("status") == "queued" and "retry_in_ms" in s
               for s in statuses), statuses  # fmt: skip
    assert chunks(events, task_id) == [(1, "old "), (1, "new")], events
    assert events[-1]["type"] == "chat.response"
    assert events[-1]["data"]["content"] == "new"


async def test_failures_not_retryable_and_out_of_attempts(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README: retryable false ends the task `failed` with chat.error (the AES's `code`);
    retryable true on the last attempt (ORCHESTRATOR_MAX_TASK_ATTEMPTS=3) ends it failed with
    `attempts` 3."""
    _, api = aes_stack
    aes = Aes(redis, "aes-fail")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    once = await start_task(api, tenant, session)
    stream, entry, action = await aes.take(once)
    await aes.answer(action, {"action_type": "execution.failed", "error": "bad input",
                              "code": "agent_refused", "retryable": False})  # fmt: skip
    await aes.ack(stream, entry)
    final = (await events_until(ws, final_of(once)))[-1]
    assert final["type"] == "chat.error", final
    assert final["data"]["code"] == "agent_refused", final
    assert (await task_state(api, tenant, once))["status"] == "failed"

    always = await start_task(api, tenant, session)
    for attempt in (1, 2, 3):
        stream, entry, action = await aes.take(always, attempt=attempt)
        await aes.answer(action, {"action_type": "execution.failed", "error": "flaky",
                                  "retryable": True})  # fmt: skip
        await aes.ack(stream, entry)
    final = (await events_until(ws, final_of(always)))[-1]
    await ws.close()
    assert final["type"] == "chat.error", final
    assert final["data"]["attempts"] == 3, final
    assert (await task_state(api, tenant, always))["status"] == "failed"


async def test_seed_execution_callback_applies_to_the_current_attempt(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README Seed compatibility: one `execution.callback` (no envelope, no attempt) completes
    the task's current attempt, here attempt 2 after a retry; valid under its schema."""
    _, api = aes_stack
    aes, ws, tenant, session, task_id, stream, entry, second = await in_second_attempt(
        api, Aes(redis, "aes-seed")
    )
    seed = {
        "action_type": "execution.callback",
        "task_id": task_id,
        "tenant_id": tenant,
        "session_id": session,
        "status": "completed",
        "result": {"response": "seed answer"},
        "execution_time": 1.5,
        "tokens_used": {"input": 3, "output": 4, "total": 7},
    }
    schema("execution.callback").validate(seed)
    await aes.raw(second["callback_queue"], seed)
    await aes.ack(stream, entry)
    final = (await events_until(ws, final_of(task_id)))[-1]
    await ws.close()
    assert final["type"] == "chat.response", final
    assert final["data"]["content"] == "seed answer"
    assert final["data"]["usage"]["input_tokens"] == 3
    assert final["data"]["usage"]["output_tokens"] == 4


async def test_cancel_notice_reaches_the_aes_and_late_answers_are_dropped(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README Cancel: a client's cancel adds chat.cancel (reason `cancelled by client`) to
    `{aes}:cancel`, read with plain XREAD; valid under schemas/chat.cancel.json; the AES's
    later completion changes nothing (the client saw chat.cancelled, the task stays cancelled)."""
    _, api = aes_stack
    aes = Aes(redis, "aes-cancel")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session)
    stream, entry, action = await aes.take(task_id)
    last = (await redis.xrevrange(CANCEL, count=1)) or [(b"0-0", {})]
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        reply = await http.post("/api/chat/cancel", json={"task_id": task_id}, headers=auth(tenant))
    assert reply.status_code == 200, reply.text
    notice = None
    async with asyncio.timeout(10):
        while notice is None:
            got = await redis.xread({CANCEL: last[0][0]}, block=500)
            for _, entries in got or []:
                for _, fields in entries:
                    candidate = json.loads(fields[b"action"])
                    if candidate.get("task_id") == task_id:
                        notice = candidate
    schema("chat.cancel").validate(notice)
    assert (notice["tenant_id"], notice["session_id"]) == (tenant, session)
    assert notice["reason"] == "cancelled by client"
    await aes.answer(action, {"action_type": "execution.completed", "content": "too late"})
    await aes.ack(stream, entry)
    events = await marker(aes, action, ws, 1)
    await ws.close()
    finals = [
        e["type"] for e in events if e.get("task_id") == task_id and e["type"] != "chat.status"
    ]
    assert finals == ["chat.cancelled"], events
    assert (await task_state(api, tenant, task_id))["status"] == "cancelled"


async def dead_letters_of(redis: Redis, needle: str) -> list[dict[bytes, bytes]]:
    return [f for _, f in await redis.xrange(DLQ) if needle.encode() in b"".join(f.values())]


async def test_malformed_callbacks_are_dead_lettered_and_the_partition_goes_on(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README: an entry that is not a valid action (bad JSON, no `action` field, a missing
    field, an unknown action_type, an id that is not [A-Za-z0-9_-]{1,64}) goes to
    `{dlq}:actions` with the reason and never stops a consumer: the session's next callbacks
    on the same partition still apply."""
    _, api = aes_stack
    aes = Aes(redis, "aes-malformed")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session)
    stream, entry, action = await aes.take(task_id)
    queue = action["callback_queue"]
    tag = unique("bad")
    env = {"tenant_id": tenant, "session_id": session, "task_id": task_id, "attempt": 1}
    await aes.raw(queue, '{"action_type": "execution.chunk", "tag": "' + tag + '-json", ')
    no_field = (
        await redis.xadd(queue, {"payload": json.dumps({**env, "tag": tag + "-field"})})
    ).decode()
    await aes.raw(
        queue, {**env, "action_type": "execution.chunk", "delta": "x", "tag": tag + "-noseq"}
    )
    await aes.raw(
        queue, {**env, "action_type": "execution.progress", "pct": 5, "tag": tag + "-type"}
    )
    await aes.raw(queue, {**env, "session_id": "a:b}", "action_type": "websocket.send",
                          "message": {}, "tag": tag + "-id"})  # fmt: skip
    await aes.answer(action, {"action_type": "execution.chunk", "seq": 1, "delta": "fine"})
    await aes.answer(action, {"action_type": "execution.completed", "content": "fine"})
    await aes.ack(stream, entry)
    events = await events_until(ws, final_of(task_id))
    await ws.close()
    assert chunks(events, task_id) == [(1, "fine")], events
    assert events[-1]["type"] == "chat.response", events
    async with asyncio.timeout(5):
        while not await dead_letters_of(redis, no_field):
            await asyncio.sleep(0.05)
    missing = [
        k for k in ("json", "noseq", "type", "id") if not await dead_letters_of(redis, f"{tag}-{k}")
    ]
    assert missing == [], (missing, await redis.xrange(DLQ))
    for kind in ("json", "noseq", "type", "id"):
        async with asyncio.timeout(5):
            while not await dead_letters_of(redis, f"{tag}-{kind}"):
                await asyncio.sleep(0.05)
        (letter,) = await dead_letters_of(redis, f"{tag}-{kind}")
        assert any(b"reason" in k for k in letter), letter


async def test_callbacks_naming_another_tenant_or_an_unknown_task_change_nothing(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """An AES bug (or a hostile tenant's agent output echoed into ids) must not write into
    another tenant's session: a completion naming tenant B's session and task but tenant A,
    or tenant A's session, reaches nobody and leaves B's task running; a callback of an
    unknown task is dropped without blocking the partition. B's own answer then applies."""
    _, api = aes_stack
    aes = Aes(redis, "aes-tenancy")
    await aes.ensure_group()
    victim, intruder = unique("tb"), unique("ta")
    v_session, i_session = unique("s"), unique("s")
    v_ws, _ = await connect(api.ws_url, victim, v_session)
    i_ws, _ = await connect(api.ws_url, intruder, i_session)
    task_id = await start_task(api, victim, v_session)
    stream, entry, action = await aes.take(task_id)
    queue = action["callback_queue"]
    for tenant, session in ((intruder, v_session), (intruder, i_session), (victim, i_session)):
        await aes.raw(queue, {"action_type": "execution.completed", "tenant_id": tenant,
                              "session_id": session, "task_id": task_id, "attempt": 1,
                              "content": "injected"})  # fmt: skip
    await aes.raw(queue, {"action_type": "execution.completed", "tenant_id": victim,
                          "session_id": v_session, "task_id": unique("nosuch"), "attempt": 1,
                          "content": "unknown"})  # fmt: skip
    await marker(aes, action, v_ws, 7)
    assert (await task_state(api, victim, task_id))["status"] == "processing"
    await aes.answer(action, {"action_type": "execution.completed", "content": "real"})
    await aes.ack(stream, entry)
    events = await events_until(v_ws, final_of(task_id))
    assert events[-1]["type"] == "chat.response"
    assert events[-1]["data"]["content"] == "real"
    with pytest.raises(TimeoutError):  # the intruder's socket gets nothing
        await events_until(i_ws, lambda e: e["type"] != "pong", timeout=0.5)
    await v_ws.close()
    await i_ws.close()


async def test_a_run_writing_its_chunks_again_gives_one_coherent_stream(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README: a run whose callback write failed may write its callbacks again from the
    first, with the same `seq` and `delta` each; the worker drops the chunks it applied. (It
    said a run could "simply start again", which an agent whose words differ cannot: the
    client streamed the first run's start before the second's end.)"""
    _, api = aes_stack
    aes = Aes(redis, "aes-restart")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session)
    stream, entry, action = await aes.take(task_id)
    words = ["The ", "cat ", "ran home"]
    for seq, delta in enumerate(words[:2], start=1):
        await aes.answer(action, {"action_type": "execution.chunk", "seq": seq, "delta": delta})
    # the run's next write fails (Redis reset): it writes what it kept again, then goes on
    for seq, delta in enumerate(words, start=1):
        await aes.answer(action, {"action_type": "execution.chunk", "seq": seq, "delta": delta})
    await aes.answer(action, {"action_type": "execution.completed", "content": "".join(words)})
    await aes.ack(stream, entry)
    events = await events_until(ws, final_of(task_id))
    await ws.close()
    assert [seq for seq, _ in chunks(events, task_id)] == [1, 2, 3], events
    streamed = "".join(delta for _, delta in chunks(events, task_id))
    assert streamed == events[-1]["data"]["content"] == "The cat ran home", (streamed, events)


async def test_a_completion_missing_session_id_fails_its_task_at_once(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README: "a completion or failure that still cannot be read is dead-lettered with the
    reason, and its task fails at once with chat.error malformed_answer ... instead of waiting
    for its deadline". A completion that forgot `session_id` still names its task (task ids
    are unique: `{t:ID}:where` maps one to its tenant and session), yet the task is left
    `processing` and the client waits for the deadline (minutes)."""
    _, api = aes_stack
    aes = Aes(redis, "aes-nosession")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session)
    stream, entry, action = await aes.take(task_id)
    await aes.raw(action["callback_queue"], {"action_type": "execution.completed",
                                             "tenant_id": tenant, "task_id": task_id,
                                             "attempt": 1, "content": "answer"})  # fmt: skip
    await aes.ack(stream, entry)
    async with asyncio.timeout(5):
        while not await dead_letters_of(redis, task_id):
            await asyncio.sleep(0.05)
    events = await marker(aes, action, ws, 3)
    await ws.close()
    state = await task_state(api, tenant, task_id)
    assert state["status"] == "failed", (state, events)


async def test_a_malformed_seed_callback_fails_a_retried_task_at_once(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README: the seed's `execution.callback` "is applied to the task's current attempt",
    and a final answer that cannot be read fails its task at once (`malformed_answer`). A
    seed callback that cannot be read (a status the schema does not list) on a task in its
    second attempt is turned into a failure of attempt 1 (it carries no attempt), which is
    stale: the task stays `processing` until its deadline."""
    _, api = aes_stack
    aes, ws, tenant, session, task_id, stream, entry, second = await in_second_attempt(
        api, Aes(redis, "aes-seedbad")
    )
    await aes.raw(second["callback_queue"], {"action_type": "execution.callback",
                                             "task_id": task_id, "tenant_id": tenant,
                                             "session_id": session, "status": "error",
                                             "error": {"message": "agent crashed"}})  # fmt: skip
    await aes.ack(stream, entry)
    events = await marker(aes, second, ws, 4)
    await ws.close()
    state = await task_state(api, tenant, task_id)
    assert state["status"] == "failed", (state, [e["type"] for e in events])


async def test_a_callback_without_the_action_field_keeps_its_content_and_fails_its_task(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README: an entry that is not a valid action "is moved to the dead-letter stream
    `{dlq}:actions` with the reason". An AES that named the field `payload` (or `data`, as
    many stream libraries do) had its final answer dead-lettered with `action` empty: the
    answer itself was gone (neither `orchestrator deadletters list` nor a replay could show
    it), and its task was left to its deadline. The dead letter now keeps the entry's
    fields, and the task fails at once."""
    _, api = aes_stack
    aes = Aes(redis, "aes-nofield")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session)
    stream, entry, action = await aes.take(task_id)
    answer = json.dumps({"action_type": "execution.completed", "tenant_id": tenant,
                         "session_id": session, "task_id": task_id, "attempt": 1,
                         "content": "the only copy of the answer"})  # fmt: skip
    entry_id = (await redis.xadd(action["callback_queue"], {"payload": answer})).decode()
    await aes.ack(stream, entry)
    final = (await events_until(ws, final_of(task_id), timeout=10))[-1]
    await ws.close()
    assert final["type"] == "chat.error", final
    assert final["data"]["code"] == "malformed_answer", final
    assert "no 'action' field" in final["data"]["message"], final
    # What `orchestrator deadletters list --json` prints of it.
    (letter,) = [
        letter.to_dict()
        for letter in await list_dead_letters(redis, newest=True, limit=100)
        if letter.entry_id == entry_id
    ]
    assert letter["fields"] == {"payload": answer}, letter
    assert letter["reason"] == "stream entry has no 'action' field", letter


async def test_a_completion_without_attempt_fails_a_retried_task_at_once(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """The schemas did not require `attempt` (default 1), so an AES built from them could
    leave it out; on a task in its second attempt that answer was taken for attempt 1 and
    dropped as stale, silently: the task stayed `processing` until its deadline. `attempt`
    is now required; an answer without it is dead-lettered and fails the current attempt at
    once (`malformed_answer`)."""
    _, api = aes_stack
    aes, ws, tenant, session, task_id, stream, entry, second = await in_second_attempt(
        api, Aes(redis, "aes-noattempt")
    )
    answer = {"action_type": "execution.completed", "tenant_id": tenant, "session_id": session,
              "task_id": task_id, "content": "the answer"}  # fmt: skip
    with pytest.raises(jsonschema.ValidationError, match="'attempt' is a required property"):
        schema("execution.completed").validate(answer)
    await aes.raw(second["callback_queue"], answer)
    await aes.ack(stream, entry)
    final = (await events_until(ws, final_of(task_id), timeout=10))[-1]
    await ws.close()
    assert final["type"] == "chat.error", final
    assert final["data"]["code"] == "malformed_answer", final
    assert (await task_state(api, tenant, task_id))["status"] == "failed"
    assert await dead_letters_of(redis, task_id)


async def test_websocket_send_and_broadcast_reach_whom_the_readme_says(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README: `websocket.send` reaches the session's sockets as a `message` event once per
    stream entry (the same action added twice: twice); `websocket.broadcast` reaches every
    connected socket of the tenant, and no other tenant's socket."""
    _, api = aes_stack
    aes = Aes(redis, "aes-send")
    await aes.ensure_group()
    tenant, other = unique("t"), unique("o")
    s1, s2 = unique("s"), unique("s")
    ws1, _ = await connect(api.ws_url, tenant, s1)
    ws2, _ = await connect(api.ws_url, tenant, s2)
    wso, _ = await connect(api.ws_url, other, s1)
    task_id = await start_task(api, tenant, s1)
    stream, entry, action = await aes.take(task_id)
    send = {"action_type": "websocket.send", "tenant_id": tenant, "session_id": s1,
            "task_id": task_id, "action_id": "same-send", "message": {"hello": 1}}  # fmt: skip
    schema("websocket.send").validate(send)
    await aes.raw(action["callback_queue"], send)
    await aes.raw(action["callback_queue"], send)
    cast = {"action_type": "websocket.broadcast", "tenant_id": tenant, "session_id": s1,
            "message": {"all": 1}}  # fmt: skip
    schema("websocket.broadcast").validate(cast)
    await aes.raw(action["callback_queue"], cast)
    await aes.answer(action, {"action_type": "execution.completed", "content": "done"})
    await aes.ack(stream, entry)
    got1 = await events_until(ws1, final_of(task_id))
    got2 = await events_until(ws2, lambda e: e["type"] == "message" and e["data"] == {"all": 1})
    with pytest.raises(TimeoutError):  # another tenant's socket gets nothing
        await events_until(wso, lambda e: e["type"] == "message", timeout=1)
    for ws in (ws1, ws2, wso):
        await ws.close()
    messages = [e["data"] for e in got1 if e["type"] == "message"]
    assert messages == [{"hello": 1}, {"hello": 1}, {"all": 1}], got1
    assert [e["data"] for e in got2 if e["type"] == "message"] == [{"all": 1}], got2


async def notices_of(redis: Redis, task_id: str) -> list[dict[str, Any]]:
    notices = [json.loads(f[b"action"]) for _, f in await redis.xrange(CANCEL)]
    return [n for n in notices if n.get("task_id") == task_id]


async def test_deadline_in_the_action_and_the_timed_out_notice(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README: chat.process carries the task's `deadline` (the tier's taskTimeoutSeconds);
    past it the client gets chat.error `timed_out`, `{aes}:cancel` gets chat.cancel with
    reason `timed out`, and a late completion is dropped."""
    from datetime import datetime

    _, api = aes_stack
    aes = Aes(redis, "aes-deadline")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    await QuotaStore(redis, load_settings()).set(tenant, "pro", {"taskTimeoutSeconds": 1})
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session)
    stream, entry, action = await aes.take(task_id)
    created = datetime.fromisoformat(action["created_at"].replace("Z", "+00:00"))
    deadline = datetime.fromisoformat(action["deadline"].replace("Z", "+00:00"))
    assert 0.9 <= (deadline - created).total_seconds() <= 1.5, action
    # the AES keeps its claim while it works, as the README says
    assert await aes.keep_alive(stream, entry)
    final = (await events_until(ws, final_of(task_id), timeout=10))[-1]
    assert final["type"] == "chat.error", final
    assert final["data"]["code"] == "timed_out", final
    # The notice follows the client's event (the worker writes it in a later round trip).
    async with asyncio.timeout(5):
        while not (mine := await notices_of(redis, task_id)):
            await asyncio.sleep(0.02)
    assert mine[0]["reason"] == "timed out", mine
    schema("chat.cancel").validate(mine[0])
    await aes.answer(action, {"action_type": "execution.completed", "content": "late"})
    await aes.ack(stream, entry)
    events = await marker(aes, action, ws, 9)
    await ws.close()
    assert [e for e in events if e.get("task_id") == task_id] == [], events
    assert (await task_state(api, tenant, task_id))["status"] == "timed_out"


async def test_a_long_run_kept_alive_is_not_reclaimed_nor_trimmed(
    aes_stack: tuple[LocalStack, Child], redis: Redis
) -> None:
    """README: refresh the claim with `XCLAIM ... JUSTID` (min-idle 0) so a long, healthy run
    is not reclaimed by another instance's `XAUTOCLAIM`; the workers' trim of the AES streams
    (every 5 s) keeps an entry the group holds pending while later ones are acknowledged; a
    callback whose trace_context is not a valid traceparent is still applied."""
    _, api = aes_stack
    busy, other = Aes(redis, "aes-long-a"), Aes(redis, "aes-long-b")
    await busy.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session)
    stream, entry, action = await busy.take(task_id)
    later = await start_task(api, tenant, unique("s2"))
    s2, e2, _ = await other.take(later)
    await other.ack(s2, e2)
    for _ in range(14):  # 7 s: more than one trim round
        assert await busy.keep_alive(stream, entry) == [entry.encode()]
        _, claimed, _ = await redis.xautoclaim(stream, "aes", other.name, 400, "0-0")
        assert entry.encode() not in claimed, claimed  # (others' leftovers may be taken)
        await asyncio.sleep(0.5)
    assert await redis.xrange(stream, entry, entry), "the pending entry was trimmed"
    garbage = {"traceparent": "garbage", "tracestate": "x"}
    await busy.answer(
        action,
        {"action_type": "execution.completed", "content": "slow", "trace_context": garbage},
    )
    await busy.ack(stream, entry)
    final = (await events_until(ws, final_of(task_id)))[-1]
    await ws.close()
    assert final["type"] == "chat.response", final
    assert final["data"]["content"] == "slow", final


async def test_an_aes_making_its_group_at_the_newest_entry_gets_the_earlier_messages(
    tmp_path: Path,
) -> None:
    """README never said who makes the group `aes`: the orchestrator did not, so an AES that
    made it at `$` (the newest entry, as many examples do) never received the messages sent
    before it first started. The worker now makes it at start, from the streams' start."""
    server = RedisServer().start()
    stack = new_stack(server, tmp_path / "logs")
    redis = Redis.from_url(server.url)
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.wait_ready(api)
        async with asyncio.timeout(10):  # the worker's start: nothing to await but the group
            while not await _aes_groups_made(redis):
                await asyncio.sleep(0.05)
        tenant, session = unique("t"), unique("s")
        task_id = await start_task(api, tenant, session)
        for stream in STREAMS:  # the AES starts later and makes its group at `$`
            with pytest.raises(ResponseError, match="BUSYGROUP"):
                await redis.xgroup_create(stream, "aes", id="$", mkstream=True)
        _, _, action = await Aes(redis, "late").take(task_id, timeout=10)
        assert action["task_id"] == task_id
    finally:
        await redis.aclose()
        stack.stop()
        server.cleanup()


async def _aes_groups_made(redis: Redis) -> bool:
    for stream in STREAMS:
        if not await redis.exists(stream):
            return False
        if not any(group["name"] == b"aes" for group in await redis.xinfo_groups(stream)):
            return False
    return True

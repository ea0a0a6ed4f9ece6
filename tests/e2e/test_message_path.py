"""A chat message travels the whole path on real processes: REST or socket in, events out."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.core import keys
from services.core.actions import ACTION_FIELD, ChatCancel, decode_action
from services.core.events import parse_event_id
from services.core.settings import load_settings
from tests.e2e.clients import (
    Event,
    auth,
    connect,
    events_until,
    final_of,
    send,
    unique,
)
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, new_stack, redis_client

pytestmark = pytest.mark.e2e


def assert_streamed_answer(events: list[Event], task_id: str, message: str) -> None:
    """status -> chunks 1..n in order -> response whose content is the chunks joined."""
    mine = [e for e in events if e.get("task_id") == task_id]
    kinds = [e["type"] for e in mine]
    assert kinds[0] == "chat.status"
    assert mine[0]["data"]["status"] == "processing"
    assert kinds[-1] == "chat.response"
    chunks = [e for e in mine if e["type"] == "chat.chunk"]
    assert kinds == ["chat.status"] + ["chat.chunk"] * len(chunks) + ["chat.response"]
    assert [c["data"]["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
    response = mine[-1]["data"]
    assert response["role"] == "assistant"
    assert "".join(c["data"]["delta"] for c in chunks) == response["content"]
    assert message in response["content"]
    ids = [e["id"] for e in mine]
    assert len(set(ids)) == len(ids)


async def test_rest_message_streams_back_on_the_socket_and_completes(
    deployment: Deployment,
) -> None:
    tenant, session = unique("t"), unique("s")
    ws, ack = await connect(deployment.api.ws_url, tenant, session)
    assert ack["data"]["session_id"] == session
    async with httpx.AsyncClient() as http:
        reply = await send(
            http,
            deployment.api.url,
            tenant,
            {"message": "hello over rest", "stream": True, "session_id": session},
        )
        assert reply.status_code == 202, reply.text
        accepted = reply.json()
        assert accepted["status"] == "processing"
        task_id = accepted["task_id"]
        events = await events_until(ws, final_of(task_id))
        assert_streamed_answer(events, task_id, "hello over rest")

        status = await http.post(
            f"{deployment.api.url}/api/chat/status", json={"task_id": task_id}, headers=auth(tenant)
        )
        assert status.status_code == 200
        body = status.json()
        assert body["status"] == "completed"
        assert body["result"]["content"] == events[-1]["data"]["content"]
        assert body["usage"]["output_tokens"] > 0
        assert body["usage"]["model"]
        by_path = await http.get(
            f"{deployment.api.url}/api/chat/tasks/{task_id}", headers=auth(tenant)
        )
        assert by_path.json() == body
    await ws.close()


async def test_socket_chat_send_gets_the_same_answer(deployment: Deployment) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    await ws.send(
        '{"type": "chat.send", "data": {"message": "hi by socket", "stream": true,'
        ' "request_id": "r1"}}'
    )
    first = await events_until(ws, lambda e: e["type"] == "chat.status")
    status = first[-1]
    assert status["data"]["request_id"] == "r1"
    task_id = status["task_id"]
    events = first + await events_until(ws, final_of(task_id))
    assert_streamed_answer(events, task_id, "hi by socket")
    await ws.close()


async def test_non_streaming_message_gets_only_status_and_response(
    deployment: Deployment,
) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, deployment.api.url, tenant, {"message": "plain"}, **{"X-Session-ID": session}
        )
    task_id = reply.json()["task_id"]
    events = await events_until(ws, final_of(task_id))
    assert [e["type"] for e in events] == ["chat.status", "chat.response"]
    await ws.close()


async def test_an_answered_action_is_acknowledged_with_its_answer(
    deployment: Deployment, e2e_redis: RedisServer
) -> None:
    """The reference executor adds the answer and acknowledges the action in one step: by the
    time the client has the answer, the action is no longer pending for the AES group."""
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    client = redis_client(e2e_redis)
    try:
        async with httpx.AsyncClient() as http:
            for stream in (False, True):
                reply = await send(
                    http,
                    deployment.api.url,
                    tenant,
                    {"message": "ack me", "stream": stream, "session_id": session},
                )
                task_id = reply.json()["task_id"]
                await events_until(ws, final_of(task_id))
                found = [
                    (aes, entry_id)
                    for aes in map(keys.aes_stream, keys.PRIORITIES)
                    for entry_id, fields in await client.xrange(aes)
                    if task_id.encode() in fields[b"action"]
                ]
                assert len(found) == 1
                aes, entry_id = found[0]
                pending = await client.xpending_range(
                    aes, keys.AES_GROUP, min=entry_id, max=entry_id, count=1
                )
                assert pending == []
    finally:
        await client.aclose()
        await ws.close()


async def test_a_finished_task_leaves_no_deadline_behind(
    deployment: Deployment, e2e_redis: RedisServer
) -> None:
    """A task's deadline is for unfinished tasks: the worker removes it when the task ends
    (answered or failed for good), instead of leaving it to fire minutes later for nothing."""
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    client = redis_client(e2e_redis)
    partitions = load_settings().callback_partitions  # the stack runs with the default
    deadlines = keys.partition_deadlines(keys.partition_of(tenant, session, partitions))
    failing = {"simulate": {"fail_attempts": 1, "retryable": False}}
    try:
        async with httpx.AsyncClient() as http:
            for body in ({"message": "answer me"}, {"message": "fail me", "context": failing}):
                reply = await send(
                    http, deployment.api.url, tenant, {**body, "session_id": session}
                )
                task_id = reply.json()["task_id"]
                member = keys.task_member(tenant, session, task_id)
                events = await events_until(ws, final_of(task_id))
                assert events[-1]["type"] in ("chat.response", "chat.error")
                # Removed with the acks of the worker's next round: within its read's block.
                for _ in range(100):
                    if await client.zscore(deadlines, member) is None:
                        break
                    await asyncio.sleep(0.02)
                assert await client.zscore(deadlines, member) is None
            # Cancelled by the client: the cancel request itself removes it.
            stalled = {
                "message": "wait",
                "session_id": session,
                "context": {"simulate": {"stall": True}},
            }
            reply = await send(http, deployment.api.url, tenant, stalled)
            task_id = reply.json()["task_id"]
            member = keys.task_member(tenant, session, task_id)
            assert await client.zscore(deadlines, member) is not None
            cancel = await http.post(
                f"{deployment.api.url}/api/chat/cancel",
                json={"task_id": task_id},
                headers=auth(tenant),
            )
            assert cancel.status_code == 200
            assert await client.zscore(deadlines, member) is None
    finally:
        await client.aclose()
        await ws.close()


async def test_cancel_mid_stream_stops_the_answer(
    deployment: Deployment, e2e_redis: RedisServer
) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    slow = {"simulate": {"chunk_delay_ms": 40, "repeat": 20}}
    async with httpx.AsyncClient() as http:
        reply = await send(
            http,
            deployment.api.url,
            tenant,
            {
                "message": "a long answer please",
                "stream": True,
                "session_id": session,
                "context": slow,
            },
        )
        task_id = reply.json()["task_id"]
        await events_until(ws, lambda e: e["type"] == "chat.chunk" and e["data"]["seq"] == 2)
        cancel = await http.post(
            f"{deployment.api.url}/api/chat/cancel", json={"task_id": task_id}, headers=auth(tenant)
        )
        assert cancel.status_code == 200
        assert cancel.json() == {"task_id": task_id, "status": "cancelled"}
        tail = await events_until(ws, final_of(task_id))
        assert tail[-1]["type"] == "chat.cancelled"

        # A later message in the same session is answered after anything the cancelled task
        # could still have produced (one session's events are delivered in order).
        after = await send(
            http, deployment.api.url, tenant, {"message": "next", "session_id": session}
        )
        later = await events_until(ws, final_of(after.json()["task_id"]))
        assert not [e for e in later if e.get("task_id") == task_id]

        status = await http.get(
            f"{deployment.api.url}/api/chat/tasks/{task_id}", headers=auth(tenant)
        )
        assert status.json()["status"] == "cancelled"
        for _ in range(5):  # a client cancelling in a loop
            again = await http.post(
                f"{deployment.api.url}/api/chat/cancel",
                json={"task_id": task_id},
                headers=auth(tenant),
            )
            assert again.status_code == 409
            assert again.json()["error"]["code"] == "conflict"
    await ws.close()
    # The repeated cancel told the AES again (its first notice may have been lost), once:
    # a loop of cancels filled the cancel stream every AES shares with one task's notices.
    client = redis_client(e2e_redis)
    try:
        notices = [
            decode_action(fields[ACTION_FIELD.encode()])
            for _, fields in await client.xrange(keys.CANCEL_STREAM)
        ]
    finally:
        await client.aclose()
    assert [n.task_id for n in notices if isinstance(n, ChatCancel)].count(task_id) == 2


async def test_another_tenants_task_does_not_exist(deployment: Deployment) -> None:
    owner, intruder = unique("t"), unique("t")
    async with httpx.AsyncClient() as http:
        reply = await send(http, deployment.api.url, owner, {"message": "mine"})
        task_id = reply.json()["task_id"]
        for request in (
            http.get(f"{deployment.api.url}/api/chat/tasks/{task_id}", headers=auth(intruder)),
            http.post(
                f"{deployment.api.url}/api/chat/status",
                json={"task_id": task_id},
                headers=auth(intruder),
            ),
            http.post(
                f"{deployment.api.url}/api/chat/cancel",
                json={"task_id": task_id},
                headers=auth(intruder),
            ),
        ):
            answer = await request
            assert answer.status_code == 404
            assert answer.json()["error"]["code"] == "not_found"


async def test_resume_with_last_event_id_replays_missed_events_once(
    deployment: Deployment,
) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        first = await send(
            http, deployment.api.url, tenant, {"message": "one", "session_id": session}
        )
        seen = await events_until(ws, final_of(first.json()["task_id"]))
        await ws.close()
        missed = await send(
            http,
            deployment.api.url,
            tenant,
            {"message": "two", "stream": True, "session_id": session},
        )
        missed_id = missed.json()["task_id"]
        # Wait for the answer to be complete in the task state before reconnecting.
        for _ in range(500):
            state = await http.get(
                f"{deployment.api.url}/api/chat/tasks/{missed_id}", headers=auth(tenant)
            )
            if state.json()["status"] == "completed":
                break
            await asyncio.sleep(0.02)
    ws, ack = await connect(deployment.api.ws_url, tenant, session, last_event_id=seen[-1]["id"])
    assert ack["data"]["resumed"] is True
    replayed = await events_until(ws, final_of(missed_id))
    assert_streamed_answer(replayed, missed_id, "two")
    assert all(e["task_id"] == missed_id for e in replayed)
    await ws.close()


async def test_cross_pod_delivery_reaches_every_socket_once_in_order(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stack = new_stack(e2e_redis, tmp_path_factory.mktemp("logs"), **FAST_EXECUTOR)
    try:
        api_a, api_b = stack.start_api(), stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api_a, api_b)
        tenant, session = unique("t"), unique("s")
        on_a, _ = await connect(api_a.ws_url, tenant, session)
        on_b, _ = await connect(api_b.ws_url, tenant, session)  # a second tab, another pod
        async with httpx.AsyncClient() as http:
            reply = await send(
                http,
                api_b.url,
                tenant,
                {"message": "across pods", "stream": True, "session_id": session},
            )
            task_id = reply.json()["task_id"]
        seen_a = await events_until(on_a, final_of(task_id))
        seen_b = await events_until(on_b, final_of(task_id))
        assert_streamed_answer(seen_a, task_id, "across pods")
        assert seen_a == seen_b
        await on_a.close()
        await on_b.close()
    finally:
        stack.stop()


async def test_per_session_order_holds_with_two_workers(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stack = new_stack(
        e2e_redis,
        tmp_path_factory.mktemp("logs"),
        executor_chunk_delay_ms="1",
        partition_lease_seconds="3",
    )
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("worker")
        stack.start("executor")
        stack.start("executor")
        stack.wait_ready(api)
        tenant = unique("t")
        sessions = [unique("s") for _ in range(30)]
        sockets = {s: (await connect(api.ws_url, tenant, s))[0] for s in sessions}

        async def converse(http: httpx.AsyncClient, session: str) -> list[tuple[str, str]]:
            tasks = []
            for n in range(3):
                reply = await send(
                    http,
                    api.url,
                    tenant,
                    {"message": f"{session} message {n}", "stream": True, "session_id": session},
                )
                assert reply.status_code == 202
                tasks.append((reply.json()["task_id"], f"{session} message {n}"))
            return tasks

        async with httpx.AsyncClient() as http:
            sent: dict[str, Any] = dict(
                zip(
                    sessions,
                    await asyncio.gather(*(converse(http, s) for s in sessions)),
                    strict=True,
                )
            )

        async def check(session: str) -> None:
            ws = sockets[session]
            last_task = sent[session][-1][0]
            pending = {task_id for task_id, _ in sent[session]}
            events: list[Event] = []
            while pending:
                batch = await events_until(
                    ws, lambda e: e["type"] == "chat.response" and e.get("task_id") in pending
                )
                events += batch
                pending.discard(batch[-1]["task_id"])
            for task_id, message in sent[session]:
                assert_streamed_answer(events, task_id, message)
            assert last_task in {e.get("task_id") for e in events}
            ids = [parse_event_id(e["id"]) for e in events]
            assert ids == sorted(set(ids)), "events arrive in log order, each once"
            await ws.close()

        await asyncio.gather(*(check(s) for s in sessions))
        client = redis_client(e2e_redis)
        assert await client.zcard("{workers}:heartbeats") >= 2
        await client.aclose()
    finally:
        stack.stop()

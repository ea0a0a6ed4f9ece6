"""Usage of a task still running when its session is erased (`DELETE /api/sessions/{id}`):
README says usage stays counted. A completion crossing the erasure found no task, so its
tokens were never counted (a client dodged its budget by erasing at the last chunk, where a
cancel does not let it), and the dropped task never reached PostgreSQL, so `/api/usage` never
counted its request. Real api and worker processes, Valkey and PostgreSQL; the test answers
as an external AES (tests/e2e/external_aes.py) so the timing is exact."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.stack import Child, LocalStack
from services.core import keys
from tests.e2e.clients import auth, connect, events_until, unique
from tests.e2e.external_aes import Aes
from tests.e2e.test_external_aes import client_redis, start_task

pytestmark = pytest.mark.e2e


def today() -> str:
    return datetime.now(UTC).date().isoformat()


async def redis_usage(redis: Redis, tenant: str) -> dict[str, str]:
    raw = await redis.hgetall(keys.tenant_usage(tenant, today()))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def callback_consumed(redis: Redis, queue: str, entry_id: str, timeout: float = 15) -> None:
    """Until the worker group has read `entry_id` on `queue` and acknowledged everything (its
    usage counts go in the same round trip as the acks, before them)."""

    def as_tuple(eid: str) -> tuple[int, int]:
        ms, seq = eid.split("-")
        return int(ms), int(seq)

    deadline = time.monotonic() + timeout
    while True:
        groups = await redis.xinfo_groups(queue)
        for group in groups:
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            if name != keys.WORKER_GROUP:
                continue
            last = group["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            if as_tuple(last) >= as_tuple(entry_id) and int(group["pending"]) == 0:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"callback {entry_id} on {queue} not consumed: {groups}")
        await asyncio.sleep(0.05)


async def api_usage(api: Child, tenant: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        reply = await http.get("/api/usage", headers=auth(tenant))
    assert reply.status_code == 200, reply.text
    return list(reply.json()["days"])


async def api_usage_when(
    api: Child, tenant: str, done: Any, timeout: float = 15
) -> list[dict[str, Any]]:
    """/api/usage once `done(days)` holds (the writer is asynchronous), or the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        days = await api_usage(api, tenant)
        if done(days) or time.monotonic() > deadline:
            return days
        await asyncio.sleep(0.05)


USAGE = {"input_tokens": 1000, "output_tokens": 2000, "model": "m", "cost": 0.25}


async def test_completion_crossing_a_session_erase_counts_like_one_crossing_a_cancel(
    aes_less_stack: tuple[LocalStack, Child, Child],
) -> None:
    stack, api, _ = aes_less_stack
    redis = client_redis(stack)
    aes = Aes(redis, "aes-erase")
    await aes.ensure_group()
    tenant = unique("t")

    # Control: cancel at the last chunk, then the completion arrives: counted (README).
    cancelled_session = unique("s")
    task_a = await start_task(api, tenant, cancelled_session)
    stream, entry, action = await aes.take(task_a)
    await aes.answer(action, {"action_type": "execution.chunk", "seq": 1, "delta": "almost"})
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        reply = await http.post("/api/chat/cancel", json={"task_id": task_a}, headers=auth(tenant))
    assert reply.status_code == 200, reply.text
    done = await aes.answer(
        action, {"action_type": "execution.completed", "content": "done", "usage": USAGE}
    )
    await aes.ack(stream, entry)
    await callback_consumed(redis, action["callback_queue"], done)
    after_cancel = await redis_usage(redis, tenant)
    assert int(after_cancel.get("tokens", 0)) == 3000, after_cancel

    # The same race with the session erased instead of the task cancelled.
    erased_session = unique("s")
    ws, _ = await connect(api.ws_url, tenant, erased_session)
    task_b = await start_task(api, tenant, erased_session)
    stream, entry, action = await aes.take(task_b)
    chunk = await aes.answer(
        action, {"action_type": "execution.chunk", "seq": 1, "delta": "almost"}
    )
    await events_until(ws, lambda e: e.get("task_id") == task_b and e["type"] == "chat.chunk")
    await ws.close()
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        erased = await http.delete(f"/api/sessions/{erased_session}", headers=auth(tenant))
    assert erased.status_code == 200, erased.text
    done = await aes.answer(
        action, {"action_type": "execution.completed", "content": "done", "usage": USAGE}
    )
    await aes.ack(stream, entry)
    await callback_consumed(redis, action["callback_queue"], done)
    after_erase = await redis_usage(redis, tenant)
    await redis.aclose()
    assert chunk
    assert int(after_erase.get("tokens", 0)) == 6000, (
        "the AES spent 3000 tokens on the erased session's task; the budget counted "
        f"{int(after_erase.get('tokens', 0)) - 3000} of them: {after_erase}"
    )


async def test_api_usage_counts_the_request_of_a_task_erased_while_running(
    aes_less_stack: tuple[LocalStack, Child, Child],
) -> None:
    stack, api, _ = aes_less_stack
    redis = client_redis(stack)
    aes = Aes(redis, "aes-erase2")
    await aes.ensure_group()
    tenant = unique("t")
    # One ordinary task that completes, so /api/usage has something for the day.
    kept = unique("s")
    task_a = await start_task(api, tenant, kept)
    stream, entry, action = await aes.take(task_a)
    await aes.answer(
        action, {"action_type": "execution.completed", "content": "ok", "usage": USAGE}
    )
    await aes.ack(stream, entry)
    # One erased while its AES runs it; the AES was told to stop and answers nothing more.
    gone = unique("s")
    task_b = await start_task(api, tenant, gone)
    stream, entry, action = await aes.take(task_b)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        erased = await http.delete(f"/api/sessions/{gone}", headers=auth(tenant))
        again = await http.delete(f"/api/sessions/{gone}", headers=auth(tenant))
    assert erased.status_code == 200, erased.text
    # What the erasure kept of the running task is not a session left to erase (it answered
    # 200 and deleted it, and the late completion's usage went uncounted again).
    assert again.status_code == 404, again.text
    await aes.ack(stream, entry)
    # A third task after the erase: once it is in /api/usage, the writer is past the erase.
    task_c = await start_task(api, tenant, kept)
    stream, entry, action = await aes.take(task_c)
    await aes.answer(
        action, {"action_type": "execution.completed", "content": "ok", "usage": USAGE}
    )
    await aes.ack(stream, entry)
    redis_requests = int((await redis_usage(redis, tenant)).get("requests", 0))
    await redis.aclose()
    days = await api_usage_when(
        api, tenant, lambda d: sum(day["output_tokens"] for day in d) >= 4000
    )
    assert sum(day["output_tokens"] for day in days) == 4000, days
    requests = sum(day["requests"] for day in days)
    assert requests == redis_requests == 3, (
        f"3 requests accepted (Redis budget hash counts {redis_requests}); /api/usage reports "
        f"{requests}: the erased running task is missing ({days})"
    )


async def test_a_socket_open_on_an_erased_session_is_told_its_running_task_ended(
    aes_less_stack: tuple[LocalStack, Child, Child],
) -> None:
    """The erasure ends a running task as cancelled, but its sockets got no final event: a
    page showing the streamed answer waited for its end for ever."""
    stack, api, _ = aes_less_stack
    redis = client_redis(stack)
    aes = Aes(redis, "aes-erase-notice")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task = await start_task(api, tenant, session)
    _, _, action = await aes.take(task)
    await aes.answer(action, {"action_type": "execution.chunk", "seq": 1, "delta": "half"})
    await events_until(ws, lambda e: e.get("task_id") == task and e["type"] == "chat.chunk")
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        erased = await http.delete(f"/api/sessions/{session}", headers=auth(tenant))
    assert erased.status_code == 200, erased.text
    seen = await events_until(ws, lambda e: e.get("task_id") == task and e["type"] != "chat.chunk")
    await ws.close()
    await redis.aclose()
    assert seen[-1]["type"] == "chat.cancelled", seen
    assert seen[-1]["data"] == {"status": "cancelled", "reason": "session_erased"}

"""A REST send in flight when an api pod is told to stop (a rolling update's SIGTERM).

README "Reliability": "in-flight REST requests finish (uvicorn waits 5 s for them after the
drain)"; README "Errors": a send whose Redis did not answer in time is answered 503
`unavailable` whose `details.task_id` names the task the message may still become ("check GET
/api/chat/tasks/{task_id} before sending it again"). A real api process on a real Redis;
Redis is slow (SIGSTOP, as a failover or a long fork would make it) for 7 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer
from tests.e2e.clients import send, unique
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e

FREEZE_SECONDS = 7.0  # longer than uvicorn's 5 s graceful wait, as long as the send's own retry


async def test_a_send_in_flight_at_sigterm_is_answered_in_the_documented_shape(
    tmp_path: Path,
) -> None:
    """A REST client's `POST /api/chat/send` in flight when its api pod got SIGTERM is
    answered like any other: 503 `unavailable` in the JSON error shape with `details.task_id`,
    as the same request gets from an api that is not stopping. It got `500 Internal Server
    Error` as text/plain (uvicorn's graceful wait cancels the handler), so the client could not
    tell whether its message was queued: retrying may send it twice, not retrying may lose
    it. Found by the rolling-update review."""
    redis = RedisServer().start()
    stack = new_stack(redis, tmp_path / "logs", drain_seconds="0.5", executor_chunk_delay_ms="0")
    frozen = False
    assert redis.process is not None
    try:
        leaving = stack.start_api()
        await asyncio.to_thread(stack.wait_ready, leaving)
        tenant, session = unique("t"), unique("s")
        async with httpx.AsyncClient(timeout=30) as http:
            warm = await send(
                http, leaving.url, tenant, {"message": "warm", "session_id": unique("s")}
            )
            assert warm.status_code == 202, warm.text
            os.kill(redis.process.pid, signal.SIGSTOP)
            frozen = True
            in_flight = asyncio.create_task(
                send(http, leaving.url, tenant, {"message": "in flight", "session_id": session})
            )
            await asyncio.sleep(0.5)  # the request has reached the api and waits on Redis
            leaving.process.send_signal(signal.SIGTERM)  # the rollout replaces this pod
            await asyncio.sleep(FREEZE_SECONDS)
            os.kill(redis.process.pid, signal.SIGCONT)
            frozen = False
            reply = await asyncio.wait_for(in_flight, 20)
            await asyncio.to_thread(leaving.process.wait, 20)

        is_json = reply.headers.get("content-type", "").startswith("application/json")
        shape_ok = reply.status_code == 202 or (
            reply.status_code == 503 and is_json and "task_id" in reply.json()["error"]["details"]
        )
        assert shape_ok, (
            f"in-flight send at SIGTERM answered {reply.status_code} "
            f"{reply.headers.get('content-type')!r} {reply.text[:120]!r}: no task id, so the "
            "client cannot tell whether the message was queued before it sends it again"
        )
    finally:
        if frozen:
            os.kill(redis.process.pid, signal.SIGCONT)
        await asyncio.to_thread(stack.stop)
        redis.cleanup()

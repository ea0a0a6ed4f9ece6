"""An executor replaced while it streams an answer longer than the drain window (README
"Reliability": "an executor lets running tasks finish within the drain window"; what it could
not finish stays pending and another executor takes it over after
`EXECUTOR_RECLAIM_IDLE_SECONDS`, "Configuration")."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e


async def test_a_task_cut_by_an_executor_rollout_reaches_the_client_once(
    e2e_redis: RedisServer, tmp_path: Path
) -> None:
    """Written by the rolling-update review (tests/e2e/test_executor.py checks the drain at
    the stream level, with the task finishing inside the window; none follows a task cut by
    the window to the client).
    The old executor exits 0 right after its 1 s window, the new one reruns the task, and the
    client's socket gets chunks seq 1..n once each and one chat.response, nothing after it."""
    stack = new_stack(
        e2e_redis, tmp_path / "logs", drain_seconds="1", executor_reclaim_idle_seconds="2"
    )
    try:
        api = stack.start_api()
        stack.start("worker")
        old = stack.start("executor")
        await asyncio.to_thread(stack.wait_ready, api)
        tenant, session = unique("t"), unique("s")
        ws, _ = await connect(api.ws_url, tenant, session)
        slow = {"simulate": {"chunk_delay_ms": 150, "repeat": 3}}  # ~2 s of chunks
        async with httpx.AsyncClient() as http:
            reply = await send(
                http, api.url, tenant,
                {"message": "long one", "stream": True, "session_id": session, "context": slow},
            )  # fmt: skip
        assert reply.status_code == 202, reply.text
        task_id = reply.json()["task_id"]
        events = await events_until(ws, lambda e: e["type"] == "chat.chunk")
        stack.start("executor")  # the rollout's new pod
        code = await asyncio.to_thread(stack.stop_child, old, signal.SIGTERM)
        events += await events_until(ws, final_of(task_id), timeout=20)
        try:
            extra = await events_until(ws, lambda e: True, timeout=2)
        except TimeoutError:
            extra = []
        assert not extra, f"events after the answer: {extra}"
        await ws.close()
        assert code == 0
        mine = [e for e in events if e.get("task_id") == task_id]
        seqs = [e["data"]["seq"] for e in mine if e["type"] == "chat.chunk"]
        assert seqs == list(range(1, len(seqs) + 1)), seqs
        assert [e["type"] for e in mine if e["type"].startswith("chat.r")] == ["chat.response"]
        assert len({e["id"] for e in events}) == len(events)
    finally:
        await asyncio.to_thread(stack.stop)

"""The shared clock of a pod that started before Redis answered (real Valkey, real uvicorn api
with a skewed wall clock)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer, free_port
from tests.e2e.clients import auth, send, unique
from tests.e2e.clock_skew.helpers import start_skewed_api
from tests.e2e.conftest import new_stack, redis_client

pytestmark = pytest.mark.e2e

BEHIND_SECONDS = 120  # the pod's clock: two minutes behind


async def test_a_pod_started_before_redis_stamps_tasks_on_redis_clock(tmp_path: Path) -> None:
    """README: a task's `created_at` and deadline are on Redis's clock, measured "at start and
    every 30 s". A pod that starts while Redis is not answering yet (an install: the pods are
    up before Redis is) fails its first sync and, `keep_synced` sleeping the full 30 s after a
    failure, stamps on its own clock for up to 30 s after Redis answers: its tasks are
    created two minutes in the past, and a free or pro task's deadline (60 s, 120 s) has
    passed before it is queued (a worker times it out at once)."""
    server = RedisServer(port=free_port())
    stack = new_stack(server, tmp_path / "logs")
    try:
        api = start_skewed_api(stack, -BEHIND_SECONDS)
        async with httpx.AsyncClient(timeout=2) as http, asyncio.timeout(30):
            while True:  # liveness answers once the lifespan (and its first sync) is done
                assert api.alive(), api.output()
                try:
                    if (await http.get(f"{api.url}/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        # keep_synced's first attempt (started with the lifespan) gives up after the client's
        # ~0.5 s of retries; nothing outside the process tells when: a bounded wait.
        await asyncio.sleep(2)
        server.start()
        stack.wait_ready(api)
        tenant = unique("t")
        async with httpx.AsyncClient(timeout=10) as http:
            reply = await send(http, api.url, tenant, {"message": "hello"})
            assert reply.status_code == 202, reply.text
            task_id = reply.json()["task_id"]
            status = await http.get(f"{api.url}/api/chat/tasks/{task_id}", headers=auth(tenant))
        created = datetime.fromisoformat(status.json()["created_at"]).timestamp()
        redis = redis_client(server)
        try:
            seconds, micros = await redis.time()
        finally:
            await redis.aclose()
        off = created - (seconds + micros / 1e6)
        assert abs(off) < 5, f"created_at is {off:.0f} s off Redis's clock"
    finally:
        stack.stop()
        server.cleanup()

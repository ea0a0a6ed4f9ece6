"""/health/detailed on an api pod whose clock is off (real Valkey, worker and uvicorn api)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core import keys
from tests.e2e.clock_skew.helpers import start_skewed_api
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e

AHEAD_SECONDS = 30  # more than the 10 s partition lease


async def test_a_skewed_api_counts_the_live_workers_on_redis_clock(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """README: every timestamp one process sets and another compares is on Redis's clock,
    pods' clocks need not agree. The workers score their heartbeats with `clock.now()`
    (Redis's clock); `/health/detailed` counts them against the api's own `time.time()`. An
    api 30 s ahead reports `workers.alive: 0` while a worker heartbeats every round (one
    behind shows a killed worker as alive for as long as it is behind)."""
    stack = new_stack(redis_server, tmp_path / "logs")
    try:
        stack.start("worker")
        async with asyncio.timeout(30):
            while not await redis.zcard(keys.WORKER_HEARTBEATS):
                await asyncio.sleep(0.1)
        api = start_skewed_api(stack, AHEAD_SECONDS)
        stack.wait_ready(api)
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            body = (await http.get("/health/detailed")).json()
        assert await redis.zcard(keys.WORKER_HEARTBEATS) == 1  # the worker is alive
        assert body["components"]["workers"]["alive"] == 1, body["components"]
    finally:
        stack.stop()

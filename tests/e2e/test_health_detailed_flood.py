"""`/health/detailed` answers without a token and costs a dozen Redis commands or more (a write
among them): a flood of concurrent calls must not make one computation each (SingleFlight)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from tests.e2e.conftest import lone_api

pytestmark = pytest.mark.e2e

CALLS = 30


async def groups_read(admin: Redis) -> int:
    """XINFO GROUPS calls Redis has served: one per stream in each computation."""
    stats = await admin.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if "xinfo" in k and "groups" in k)


async def test_concurrent_calls_share_one_computation(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    admin = Redis.from_url(redis_server.url)
    with lone_api(redis_server, tmp_path) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
            await http.get("/health/detailed")  # the pool's connections made
            before = await groups_read(admin)
            assert (await http.get("/health/detailed")).status_code == 200
            one = await groups_read(admin) - before
            assert one > 0, "no XINFO GROUPS counted: the measure is wrong"
            before = await groups_read(admin)
            # Redis holds every other client's commands for a moment: all the calls come
            # while the first one's computation waits for Redis.
            await admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            answers = await asyncio.gather(*(http.get("/health/detailed") for _ in range(CALLS)))
            flood = await groups_read(admin) - before
    await admin.aclose()
    assert [a.status_code for a in answers] == [200] * CALLS
    assert {a.json()["status"] for a in answers} == {"ok"}
    assert flood <= 2 * one, f"{CALLS} concurrent calls made {flood / one:.0f} computations"

"""Connections that go silent without a FIN (a dropped NAT/conntrack entry, a load balancer
failover): the open connections stop carrying anything, new ones work."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import new_stack, redis_client
from tests.faults.conftest import FaultProxy

pytestmark = pytest.mark.e2e


async def post(http: httpx.AsyncClient, url: str, tenant: str, body: dict) -> httpx.Response:
    return await http.post(f"{url}/api/chat/send", json=body, headers=auth(tenant))


async def test_a_quota_change_applies_after_the_apis_redis_connections_went_silent(
    own_redis: RedisServer, redis_proxy: FaultProxy, tmp_path: Path
) -> None:
    """README: api pods cache quota lookups and drop the entry on the announcement, "so a
    change applies within about a second" (the cache is trusted only while announcements are
    received). After the api's open connections to Redis went silent, the api recovered (ready
    again, sends accepted) but its announcement subscription was the dead connection: it was
    never noticed, and a changed quota kept the old cached value for VALIDATION_CACHE_TTL."""
    stack = new_stack(own_redis, tmp_path / "logs", default_tier="free")
    redis = redis_client(own_redis)
    store = QuotaStore(redis, load_settings(default_tier="free"))
    try:
        api = stack.start_api(redis_url=redis_proxy.redis_url)
        stack.wait_ready(api)
        tenant = unique("t")
        await store.set(tenant, "free")
        async with httpx.AsyncClient(timeout=30) as http:
            refused = await post(http, api.url, tenant, {"message": "hi", "stream": True})
            assert refused.status_code == 403, refused.text  # free: no streaming; now cached

            assert await redis_proxy.command("silent") > 0
            # The api recovers by itself: new connections work.
            deadline = time.monotonic() + 30
            while (await http.get(f"{api.url}/health/ready")).status_code != 200:
                assert time.monotonic() < deadline, "api not ready again"
                await asyncio.sleep(0.1)
            while (
                reply := await post(http, api.url, unique("t"), {"message": "x"})
            ).status_code != 202:
                assert time.monotonic() < deadline, f"sends not accepted again: {reply.text}"
                await asyncio.sleep(0.1)

            await store.set(tenant, "pro")  # announced on a healthy connection
            changed = time.monotonic()
            while True:
                reply = await post(http, api.url, tenant, {"message": "hi", "stream": True})
                if reply.status_code == 202:
                    break
                waited = time.monotonic() - changed
                assert waited < 10, (
                    f"quota change not applied {waited:.1f} s after it was announced: "
                    f"{reply.status_code} {reply.text}"
                )
                await asyncio.sleep(0.2)
    finally:
        stack.stop()
        await redis.aclose()

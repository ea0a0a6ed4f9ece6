"""A tenant's live sockets across pods (tenant_sockets.lua) on a real Redis."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from services.core import keys
from services.core.tenant_sockets import TenantSockets


@pytest.mark.parametrize("outage", ["member expired", "data lost"])
async def test_a_socket_still_open_counts_again_at_its_pods_next_refresh(
    redis: Redis, outage: str
) -> None:
    """Redis away for longer than the ttl (its member expired) or restarted without its
    data: the socket is still open, so its pod's refresh counts it again. A refresh that
    only extended existing members left the tenant free to open `limit` more."""
    sockets = TenantSockets(redis, ttl_seconds=30)
    assert await sockets.acquire("acme", "open-1", limit=1) == (True, 1)
    assert await sockets.acquire("acme", "open-2", limit=1) == (False, 1)
    if outage == "member expired":
        await redis.zadd(keys.tenant_sockets("acme"), {"open-1": 1})  # a score long past
    else:
        await redis.delete(keys.tenant_sockets("acme"))
    assert await sockets.live("acme") == 0

    await sockets.refresh("acme", ["open-1"])

    assert await sockets.live("acme") == 1
    assert await sockets.acquire("acme", "open-2", limit=1) == (False, 1)


async def test_a_released_socket_stops_counting_and_an_unrefreshed_one_expires(
    redis: Redis,
) -> None:
    sockets = TenantSockets(redis, ttl_seconds=30)
    for socket_id in ("a", "b", "c"):
        assert (await sockets.acquire("acme", socket_id, limit=5))[0]
    await sockets.release("acme", "a")
    await redis.zadd(keys.tenant_sockets("acme"), {"b": 1})  # its pod died: never refreshed
    assert await sockets.live("acme") == 1


async def test_a_process_with_a_shorter_ttl_never_shortens_the_count(redis: Redis) -> None:
    """The operator counts a tenant's sockets (status.usage) with its own
    ORCHESTRATOR_CONNECTION_TTL_SECONDS. The script set the set's expiry to twice the caller's
    ttl: with the apis on 300 s and the operator on 1 s, each count left the whole set to
    expire in 2 s, and the tenant's maxConnections stopped holding between refreshes."""
    api = TenantSockets(redis, ttl_seconds=300)
    operator = TenantSockets(redis, ttl_seconds=1)
    assert await api.acquire("acme", "open-1", limit=1) == (True, 1)
    assert await operator.live("acme") == 1
    assert await redis.pttl(keys.tenant_sockets("acme")) > 290_000
    await TenantSockets(redis, ttl_seconds=1).refresh("acme", ["other-pod"])
    assert await redis.pttl(keys.tenant_sockets("acme")) > 290_000

"""Concurrent sockets per tenant, counted across every api pod in one sorted set per tenant.

Each socket is a member scored by its expiry; its pod refreshes it while the socket lives and
removes it on close. A pod that dies (SIGKILL, node loss) cannot remove its members, so they
expire after `ORCHESTRATOR_CONNECTION_TTL_SECONDS`: a tenant never stays locked out by a dead
pod for longer than that. Every call is one script on the tenant's slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.resources import files

from redis.asyncio import Redis

from services.core import keys


class TenantSockets:
    def __init__(self, redis: Redis, ttl_seconds: float) -> None:
        self._redis = redis
        self._ttl_ms = int(ttl_seconds * 1000)
        source = (files("services.core") / "lua" / "tenant_sockets.lua").read_text()
        self._script = redis.register_script(source)

    async def acquire(self, tenant_id: str, socket_id: str, limit: int) -> tuple[bool, int]:
        """Take a slot unless the tenant has `limit` live sockets; (admitted, live count)."""
        admitted, live = await self._script(
            keys=[keys.tenant_sockets(tenant_id)],
            args=["acquire", self._ttl_ms, limit, socket_id],
        )
        return bool(admitted), int(live)

    async def refresh(self, tenant_id: str, socket_ids: Iterable[str]) -> None:
        ids = list(socket_ids)
        if ids:
            await self._script(
                keys=[keys.tenant_sockets(tenant_id)], args=["refresh", self._ttl_ms, 0, *ids]
            )

    async def release(self, tenant_id: str, socket_id: str) -> None:
        await self._script(
            keys=[keys.tenant_sockets(tenant_id)], args=["release", self._ttl_ms, 0, socket_id]
        )

    async def live(self, tenant_id: str) -> int:
        """Live sockets of the tenant (expired members pruned first)."""
        _, count = await self._script(
            keys=[keys.tenant_sockets(tenant_id)], args=["refresh", self._ttl_ms, 0]
        )
        return int(count)

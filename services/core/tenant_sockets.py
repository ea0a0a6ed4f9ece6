"""Concurrent sockets per tenant, counted across every api pod in one sorted set per tenant.

Each socket is a member scored by its expiry; its pod refreshes it while the socket lives and
removes it on close. A pod that dies (SIGKILL, node loss) cannot remove its members, so they
expire after `ORCHESTRATOR_CONNECTION_TTL_SECONDS`: a tenant never stays locked out by a dead
pod for longer than that. Every call is one script on the tenant's slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from services.core import keys
from services.core.redis_client import REDIS_DOWN
from services.core.scripts import Scripts, missing_script

# Tenants refreshed per pipeline: a pass over 10 000 tenants is 20 round trips.
REFRESH_BATCH = 500


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

    async def refresh_all(self, by_tenant: Mapping[str, Sequence[str]]) -> dict[str, Exception]:
        """Refresh a pod's sockets of every tenant in pipelines of `REFRESH_BATCH` scripts:
        one awaited script per tenant made a pass last tenants x round trip (300 tenants at 20
        ms: 6 s), and with a pass longer than the ttl minus the interval a tenant's members
        lapsed while its sockets were open, letting it past `maxConnections`.

        On a cluster the tenants are grouped by the node that serves them and the groups run
        side by side: one node down or frozen fails (or holds up, for a command's timeout)
        its own tenants only, counted again once it is back. Returns the tenants whose
        script failed otherwise, with the error; on one server, Redis unreachable raises."""
        tenants = [(tenant, list(ids)) for tenant, ids in by_tenant.items() if ids]
        if isinstance(self._redis, RedisCluster):
            await self._redis.initialize()  # the slot map (learnt at the first command)
        groups = self._by_node(tenants)
        results = await asyncio.gather(
            *(self._refresh_group(group) for group in groups), return_exceptions=True
        )
        failed: dict[str, Exception] = {}
        for result in results:
            if isinstance(result, dict):
                failed.update(result)
            elif isinstance(result, REDIS_DOWN) and len(groups) > 1:
                continue  # that node's tenants: counted again at a later pass
            else:
                raise result
        return failed

    def _by_node(self, tenants: list[tuple[str, list[str]]]) -> list[list[tuple[str, list[str]]]]:
        if not isinstance(self._redis, RedisCluster):
            return [tenants]
        groups: dict[str, list[tuple[str, list[str]]]] = {}
        for tenant, ids in tenants:
            try:
                node = self._redis.get_node_from_key(keys.tenant_sockets(tenant))
            except (RedisError, RedisClusterException):  # its slot has no known node now:
                # a group of its own (the pipeline relearns the slot map)
                node = None
            groups.setdefault(node.name if node else "", []).append((tenant, ids))
        return list(groups.values()) or [[]]

    async def _refresh_group(self, group: list[tuple[str, list[str]]]) -> dict[str, Exception]:
        failed: dict[str, Exception] = {}
        for start in range(0, len(group), REFRESH_BATCH):
            batch = group[start : start + REFRESH_BATCH]
            replies = await self._refresh_batch(batch)
            if any(missing_script(reply) for reply in replies):  # Redis lost its scripts
                await self._redis.script_load(self._script.script)
                replies = await self._refresh_batch(batch)
            for (tenant, _), reply in zip(batch, replies, strict=True):
                if isinstance(reply, Exception) and not isinstance(reply, REDIS_DOWN):
                    failed[tenant] = reply  # (unreachable: counted again once it is back)
        return failed

    async def _refresh_batch(self, batch: Sequence[tuple[str, list[str]]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant, ids in batch:
                Scripts.queue(
                    pipe,
                    self._script,
                    [keys.tenant_sockets(tenant)],
                    ["refresh", self._ttl_ms, 0, *ids],
                )
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

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

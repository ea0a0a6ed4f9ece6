"""The pipelined socket-count refresh (`TenantSockets.refresh_all`) on a real 3-primary
Redis Cluster: the per-tenant refresh it replaced kept refreshing every reachable tenant when
one node was down (each tenant's script failed alone); a pipeline must not lose that."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from services.cli.embedded import LocalCluster
from services.core import keys
from services.core.redis_client import create_redis
from services.core.settings import load_settings
from services.core.tenant_sockets import REFRESH_BATCH, TenantSockets

pytestmark = pytest.mark.e2e


@pytest.fixture
async def cluster_client(own_cluster: LocalCluster) -> AsyncIterator[Redis]:
    client = create_redis(load_settings(redis_url=own_cluster.url, **own_cluster.client_settings()))
    yield client
    await client.aclose()


def tenants_by_node(cluster: LocalCluster) -> dict[int, str]:
    """One tenant whose socket set lives on each primary (port -> tenant id)."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < 3:
        tenant = f"hd-sock-{n}"
        port = cluster.node_of_slot(key_slot(keys.tenant_sockets(tenant).encode())).port
        found.setdefault(port, tenant)
        n += 1
    return found


async def scores(client: Redis, tenants: dict[int, str]) -> dict[str, float]:
    return {
        t: float(await client.zscore(keys.tenant_sockets(t), f"sock-{t}") or 0)
        for t in tenants.values()
    }


async def test_a_node_down_does_not_stop_the_other_nodes_tenants_being_refreshed(
    own_cluster: LocalCluster, cluster_client: Redis
) -> None:
    """One primary down (a failover under way, a node lost): the tenants on the two healthy
    primaries must still get their members refreshed, else their open sockets lapse out of
    the count after the ttl and a tenant at maxConnections is let past it. The old loop
    refreshed them (only the down node's tenant failed); the first `refresh_all` raised:
    one node down fails a cluster pipeline whole."""
    tenants = tenants_by_node(own_cluster)
    short = TenantSockets(cluster_client, 5)
    for tenant in tenants.values():
        assert (await short.acquire(tenant, f"sock-{tenant}", 10))[0]
    before = await scores(cluster_client, tenants)
    victim = own_cluster.nodes[0]
    lost = tenants[victim.port]
    own_cluster.kill(victim)
    try:
        long = TenantSockets(cluster_client, 600)
        failed = await long.refresh_all({t: [f"sock-{t}"] for t in tenants.values()})
        assert set(failed) <= {lost}
        after = await scores(cluster_client, {p: t for p, t in tenants.items() if t != lost})
        for tenant, score in after.items():
            assert score > before[tenant] + 500_000, f"{tenant} on a healthy node not refreshed"
    finally:
        own_cluster.restart(victim)


async def test_a_refresh_after_script_flush_on_every_node_refreshes_every_tenant(
    own_cluster: LocalCluster, cluster_client: Redis
) -> None:
    """Redis lost its scripts on every primary (restart without persistence of the cache, a
    SCRIPT FLUSH): the refresh reloads the script and every tenant is refreshed, none failed."""
    tenants = tenants_by_node(own_cluster)
    short = TenantSockets(cluster_client, 5)
    for tenant in tenants.values():
        assert (await short.acquire(tenant, f"sock-{tenant}", 10))[0]
    before = await scores(cluster_client, tenants)
    for node in own_cluster.nodes:
        flush = Redis(port=node.port)
        await flush.script_flush()
        await flush.aclose()
    long = TenantSockets(cluster_client, 600)
    started = time.monotonic()
    failed = await long.refresh_all({t: [f"sock-{t}"] for t in tenants.values()})
    assert failed == {}, failed
    assert time.monotonic() - started < 5
    after = await scores(cluster_client, tenants)
    for tenant, score in after.items():
        assert score > before[tenant] + 500_000, f"{tenant} not refreshed"


BOUND_SECONDS = 5.0
"""Longer than the one command timeout (`worker_sleep_seconds` 1 + 2 s) any design needs to
see that a node does not answer; the healthy nodes' own round trips take milliseconds."""


def node_port(cluster: LocalCluster, tenant: str) -> int:
    return cluster.node_of_slot(key_slot(keys.tenant_sockets(tenant).encode())).port


async def test_a_frozen_node_does_not_hold_up_the_healthy_tenants_of_the_next_batch(
    own_cluster: LocalCluster, cluster_client: Redis
) -> None:
    """One of 3 primaries frozen (SIGSTOP: a partitioned or hung node): the fallback of
    b21e466 refreshed a failed batch one tenant at a time and waited for every one, the
    unreachable ones included (each waiting out the command timeout), before the next batch:
    the 501st tenant, on a healthy primary, was refreshed 24.5 s after the pass began (600
    tenants: 27.5 s), past the default ttl's margin from ~600 tenants on a pod. The tenants
    are grouped by node now, the groups refreshed side by side."""
    frozen = own_cluster.nodes[0]
    tenants = [f"fz-{i}" for i in range(REFRESH_BATCH)]  # the first batch: a third on `frozen`
    last = next(
        t for i in range(1000) if node_port(own_cluster, t := f"fz-last-{i}") != frozen.port
    )
    tenants.append(last)  # alone in the second batch, on a healthy primary
    sockets = TenantSockets(cluster_client, 600)
    healthy = Redis(port=node_port(own_cluster, last))
    assert await sockets.refresh_all({t: [f"sock-{t}"] for t in tenants}) == {}
    before = float(await healthy.zscore(keys.tenant_sockets(last), f"sock-{last}") or 0)
    assert frozen.process is not None
    os.kill(frozen.process.pid, signal.SIGSTOP)  # a primary that does not answer
    refreshing = asyncio.create_task(sockets.refresh_all({t: [f"sock-{t}"] for t in tenants}))
    try:
        started = time.monotonic()
        refreshed_after = None
        while time.monotonic() - started < BOUND_SECONDS:
            score = float(await healthy.zscore(keys.tenant_sockets(last), f"sock-{last}") or 0)
            if score > before:
                refreshed_after = time.monotonic() - started
                break
            await asyncio.sleep(0.1)  # polling another process's write: no event to await
        assert refreshed_after is not None, (
            f"{last}, on a healthy primary, not refreshed within {BOUND_SECONDS} s: the pass "
            "waits for every unreachable tenant of the batch before"
        )
    finally:
        refreshing.cancel()
        await asyncio.gather(refreshing, return_exceptions=True)
        os.kill(frozen.process.pid, signal.SIGCONT)
        await healthy.aclose()

"""The client's connection pool in a burst: more concurrent commands than connections wait
for one (in order, up to `POOL_WAIT_SECONDS`) instead of failing with MaxConnectionsError."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Connection
from redis.exceptions import DataError, MaxConnectionsError

from services.cli.embedded import LocalCluster
from services.core.redis_client import (
    REDIS_DOWN,
    ClusterClient,
    PackedByHiredis,
    WaitingConnectionPool,
    create_redis,
)
from services.core.settings import load_settings

HOLD_SECONDS = 0.05  # a BLPOP on an empty list holds its connection this long


async def test_a_burst_beyond_the_pool_waits_for_connections(redis_url: str) -> None:
    client = create_redis(load_settings(redis_url=redis_url), max_connections=2)
    pool = client.connection_pool
    assert isinstance(pool, WaitingConnectionPool)
    try:
        held = [client.blpop(["pool:empty"], timeout=HOLD_SECONDS) for _ in range(6)]
        quick = [client.incr("pool:count") for _ in range(200)]
        results = await asyncio.gather(*held, *quick)
        assert results[:6] == [None] * 6
        assert sorted(results[6:]) == list(range(1, 201))
        assert len(pool._in_use_connections) == 0
        assert len(pool._available_connections) == 2
        assert not pool._waiters
    finally:
        await client.aclose()


async def test_waiting_ends_after_the_timeout_with_an_outage_error(redis_url: str) -> None:
    client = create_redis(load_settings(redis_url=redis_url), max_connections=1)
    pool = client.connection_pool
    assert isinstance(pool, WaitingConnectionPool)
    pool.timeout = 0.05
    try:
        holder = asyncio.ensure_future(client.blpop(["pool:empty"], timeout=1))
        await asyncio.sleep(0.02)
        with pytest.raises(MaxConnectionsError) as error:
            await client.ping()
        assert isinstance(error.value, REDIS_DOWN)  # the api answers 503 `unavailable`
        assert await holder is None
        assert await client.ping()  # the connection is free again
        assert not pool._waiters
    finally:
        await client.aclose()


def cluster_client(cluster: LocalCluster, max_connections: int) -> ClusterClient:
    settings = load_settings(redis_url=cluster.url, **cluster.client_settings())
    client = create_redis(settings, max_connections=max_connections)
    assert isinstance(client, ClusterClient)
    return client


async def test_on_a_cluster_a_burst_beyond_the_pool_waits_for_its_turn(
    redis_cluster: LocalCluster,
) -> None:
    """redis-py's per-node pools raise MaxConnectionsError at once; the client queues."""
    client = cluster_client(redis_cluster, max_connections=2)
    try:
        held = [client.blpop([f"pool:empty:{n}"], timeout=HOLD_SECONDS) for n in range(6)]
        quick = [client.incr(f"pool:count:{n % 10}") for n in range(200)]
        pipelines = []
        for n in range(20):
            pipe = client.pipeline(transaction=False)
            pipe.incr(f"pool:piped:{n % 3}").incr(f"pool:piped:{n % 5 + 3}")
            pipelines.append(pipe.execute())
        results = await asyncio.gather(*held, *quick, *pipelines)
        assert results[:6] == [None] * 6
        assert sum(results[6:206]) == sum(n // 10 + 1 for n in range(200))
        assert len(results[206:]) == 20
        assert client._turns is not None
        assert not client._turns.locked()
    finally:
        await client.aclose()


async def test_on_a_cluster_every_node_packs_commands_with_hiredis(
    redis_cluster: LocalCluster,
) -> None:
    client = cluster_client(redis_cluster, max_connections=4)
    try:
        for n in range(30):  # keys on every node
            await client.set(f"pool:packed:{n}", n)
        nodes = client.get_nodes()
        assert len(nodes) >= 3
        for node in nodes:
            assert issubclass(node.connection_class, PackedByHiredis)
            assert all(isinstance(c, PackedByHiredis) for c in node._connections)
        assert sum(len(node._connections) for node in nodes) >= 3
        assert await client.get("pool:packed:7") == b"7"
    finally:
        await client.aclose()


async def test_on_a_cluster_waiting_ends_after_the_timeout_with_an_outage_error(
    redis_cluster: LocalCluster,
) -> None:
    client = cluster_client(redis_cluster, max_connections=1)
    client.turn_timeout = 0.05
    try:
        holder = asyncio.ensure_future(client.blpop(["pool:empty"], timeout=1))
        await asyncio.sleep(0.02)
        with pytest.raises(MaxConnectionsError) as error:
            await client.ping()
        assert isinstance(error.value, REDIS_DOWN)  # the api answers 503 `unavailable`
        assert await holder is None
        assert await client.ping()  # the turn is free again
    finally:
        await client.aclose()


async def test_a_cancelled_waiter_passes_its_turn_on(redis_url: str) -> None:
    client = create_redis(load_settings(redis_url=redis_url), max_connections=1)
    pool = client.connection_pool
    assert isinstance(pool, WaitingConnectionPool)
    try:
        holder = asyncio.ensure_future(client.blpop(["pool:empty"], timeout=HOLD_SECONDS))
        await asyncio.sleep(0.01)
        first = asyncio.ensure_future(client.ping())
        second = asyncio.ensure_future(client.ping())
        await asyncio.sleep(0.01)
        assert len(pool._waiters) == 2
        first.cancel()
        assert await holder is None
        assert await asyncio.wait_for(second, 2)
        assert first.cancelled()
        assert not pool._waiters
    finally:
        await client.aclose()


async def test_commands_are_packed_by_hiredis_into_the_bytes_redis_py_sends(
    redis_url: str,
) -> None:
    client = create_redis(load_settings(redis_url=redis_url))
    connection = client.connection_pool.make_connection()
    assert isinstance(connection, PackedByHiredis)
    reference = Connection()
    commands: list[tuple[Any, ...]] = [
        ("SET", "k", b"\x00\xffbytes", "EX", 10),
        ("EVALSHA", "a" * 40, 2, "{s:t:s}:log", "{s:t:s}:mark", 1.5, 0.1, 1e-7, -3, 10**20),
        ("CONFIG GET", "maxmemory"),
        ("HSET", "h", "ünïcode", "✓"),
    ]
    try:
        for command in commands:
            assert b"".join(connection.pack_command(*command)) == b"".join(
                reference.pack_command(*command)
            )
        with pytest.raises(DataError):
            connection.pack_command("SET", "k", None)
        assert await client.set("packed", "ünïcode ✓", ex=10)
        assert await client.get("packed") == "ünïcode ✓".encode()
    finally:
        await client.aclose()

"""Fixtures shared by every test: one real Redis engine per test session, clean per test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.cli.embedded import LocalCluster, RedisServer
from services.core import keys


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client on the session's server; every key is gone before the test starts."""
    client = Redis.from_url(redis_url)
    await client.flushall()
    yield client
    # A test's own CALLBACK_PARTITIONS stays with it: the next test on the server that starts
    # processes without this fixture (the default count) would find it recorded, and refuse.
    with contextlib.suppress(RedisError):  # a test that broke its Redis has said so already
        await client.delete(keys.CALLBACK_PARTITION_COUNT)
    await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """One real 3-master Redis Cluster for the whole test session, started on first use.

    With an append-only file, so that a node a test kills and restarts keeps its data.
    """
    cluster = LocalCluster(masters=3, appendonly=True).start()
    yield cluster
    cluster.cleanup()

"""Fixtures shared by every test: one real Redis engine per test session, clean per test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Generator, Iterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.cli.embedded import LocalCluster, RedisServer
from services.core import keys

LEFTOVER_GRACE_SECONDS = 2.0  # for tasks a test's last close set ending
_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture(autouse=True)
async def _nothing_left_running(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail a test that leaves a task running. Every async test of a pytest process shares one
    event loop (pyproject: loop scope "session"), so a task left behind ran on into every later
    test, and one that did not end when cancelled held the loop's close for pytest-timeout's
    120 s at the end of the run (seen in CI: a worker whose run() raised left its timers).
    Leftovers are always cancelled; a test that failed already (and so skipped its own
    closing) is not failed twice for them."""
    before = asyncio.all_tasks()
    yield
    left = asyncio.all_tasks() - before - {asyncio.current_task()}
    if not left:
        return
    _, running = await asyncio.wait(left, timeout=LEFTOVER_GRACE_SECONDS)
    if running:
        for task in running:
            task.cancel()
        if not request.node.stash.get(_CALL_FAILED, False):
            names = sorted(f"{task.get_name()} {task.get_coro()!r}" for task in running)
            pytest.fail(f"the test left {len(running)} tasks running: {names}")


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

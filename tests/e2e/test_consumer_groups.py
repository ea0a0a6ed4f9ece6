"""Restarting workers and executors (every rollout, every HPA scale-down, every crash loop)
leaves nothing behind in Redis that grows with the number of restarts.

Each process reads its streams through a consumer group under its own consumer name (the pod
name: new for every pod in Kubernetes). Nothing deleted a consumer (`XGROUP DELCONSUMER`), so
`XINFO CONSUMERS` of every callback partition and every AES stream grew by one entry per pod
that ever lived (the soak review).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core import keys
from tests.e2e.conftest import FAST_EXECUTOR, new_stack, redis_client

pytestmark = pytest.mark.e2e

RESTARTS = 3
APPEAR_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def e2e_redis() -> Iterator[RedisServer]:
    """A Redis of this module's own: an earlier module's executor or worker killed mid-task
    leaves entries pending, which the first process started here reclaims and rightly keeps
    its consumer for (the consumer counts here are the point)."""
    server = RedisServer().start()
    yield server
    server.cleanup()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _consumers(redis: Redis, stream: str, group: str) -> set[str]:
    try:
        return {_text(c["name"]) for c in await redis.xinfo_consumers(stream, group)}
    except Exception:  # no such stream or group yet
        return set()


async def _wait_for_consumer(redis: Redis, stream: str, group: str, name: str) -> None:
    deadline = time.monotonic() + APPEAR_TIMEOUT
    while name not in await _consumers(redis, stream, group):
        assert time.monotonic() < deadline, f"{name} never read {stream}"
        await asyncio.sleep(0.05)


async def test_stopped_workers_leave_no_consumer_in_the_callback_groups(
    e2e_redis: RedisServer, tmp_path: Path
) -> None:
    redis = redis_client(e2e_redis)
    stack = new_stack(e2e_redis, tmp_path / "logs", **FAST_EXECUTOR)
    stream = keys.callback_stream(0)
    names = [f"soak-worker-{n}" for n in range(RESTARTS)]
    try:
        for name in names:
            worker = stack.start("worker", pod_name=name)
            await _wait_for_consumer(redis, stream, keys.WORKER_GROUP, name)
            assert stack.stop_child(worker) == 0  # graceful: leases given back, acks flushed
        left = {
            p: sorted(
                (await _consumers(redis, keys.callback_stream(p), keys.WORKER_GROUP)) & set(names)
            )
            for p in range(8)
        }
        pending = await redis.xpending(stream, keys.WORKER_GROUP)
    finally:
        stack.stop()
        await redis.aclose()
    assert pending["pending"] == 0
    assert all(not gone for gone in left.values()), (
        f"consumers of stopped workers still registered, per callback partition: {left}"
    )


async def test_stopped_executors_leave_no_consumer_in_the_aes_group(
    e2e_redis: RedisServer, tmp_path: Path
) -> None:
    redis = redis_client(e2e_redis)
    stack = new_stack(e2e_redis, tmp_path / "logs", **FAST_EXECUTOR)
    stream = keys.aes_stream("normal")
    names = [f"soak-executor-{n}" for n in range(RESTARTS)]
    try:
        for name in names:
            executor = stack.start("executor", pod_name=name)
            await _wait_for_consumer(redis, stream, keys.AES_GROUP, name)
            assert stack.stop_child(executor) == 0
        left = {
            p: sorted((await _consumers(redis, keys.aes_stream(p), keys.AES_GROUP)) & set(names))
            for p in keys.PRIORITIES
        }
    finally:
        stack.stop()
        await redis.aclose()
    assert all(not gone for gone in left.values()), (
        f"consumers of stopped executors still registered, per AES stream: {left}"
    )


async def test_a_killed_workers_consumer_goes_when_its_partitions_are_taken_over(
    e2e_redis: RedisServer, tmp_path: Path
) -> None:
    """A SIGKILLed worker cannot leave its groups: the worker taking its partitions over
    (their entries adopted) deletes it."""
    redis = redis_client(e2e_redis)
    stack = new_stack(e2e_redis, tmp_path / "logs", partition_lease_seconds="1", **FAST_EXECUTOR)
    stream = keys.callback_stream(0)
    try:
        killed = stack.start("worker", pod_name="soak-killed")
        await _wait_for_consumer(redis, stream, keys.WORKER_GROUP, "soak-killed")
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(timeout=10)
        stack.start("worker", pod_name="soak-next")
        deadline = time.monotonic() + APPEAR_TIMEOUT
        while True:  # the takeover happens in the new worker: nothing to await from here
            left = {
                p: await _consumers(redis, keys.callback_stream(p), keys.WORKER_GROUP)
                for p in range(8)
            }
            if all("soak-killed" not in names and "soak-next" in names for names in left.values()):
                break
            assert time.monotonic() < deadline, left
            await asyncio.sleep(0.1)
    finally:
        stack.stop()
        await redis.aclose()

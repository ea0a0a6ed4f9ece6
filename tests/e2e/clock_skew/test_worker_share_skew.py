"""Partition shares between workers whose wall clocks disagree."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core import keys
from tests.e2e.clock_skew.helpers import start_skewed
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e

PARTITIONS = 8
BEHIND_SECONDS = 60  # a minute behind: more than the 10 s lease ttl


async def lease_holders(redis: Redis) -> dict[int, str | None]:
    values = await redis.mget([keys.partition_lease(p) for p in range(PARTITIONS)])
    return {p: (v.decode() if v else None) for p, v in enumerate(values)}


async def wait_for(redis: Redis, done, timeout: float) -> dict[int, str | None]:
    holders: dict[int, str | None] = {}
    try:
        async with asyncio.timeout(timeout):
            while not done(holders := await lease_holders(redis)):
                await asyncio.sleep(0.2)
    except TimeoutError:
        pass
    return holders


async def test_a_second_worker_with_a_clock_behind_gets_a_share_of_the_partitions(
    redis: Redis, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each worker heartbeats `time.time()` into `{workers}:heartbeats` and drops members
    older than its own `time.time() - ttl`: the first worker drops the heartbeat of a worker
    one minute behind at every round, counts one live worker, keeps all 8 partitions, and the
    second worker (which counts two) finds none free: scaling out adds no consumer."""
    stack = new_stack(
        redis_server, tmp_path_factory.mktemp("logs"), callback_partitions=str(PARTITIONS)
    )
    try:
        stack.start("worker")
        holders = await wait_for(redis, lambda h: all(h.values()) and h, 20)
        assert None not in holders.values(), holders
        assert len(set(holders.values())) == 1, holders
        start_skewed(stack, "worker", -BEHIND_SECONDS)
        # Without skew the share moves within two rounds (a third of the ttl each).
        holders = await wait_for(redis, lambda h: len(set(h.values()) - {None}) == 2, 25)
        stack.check_alive()
        owners = set(holders.values()) - {None}
        heartbeats = await redis.zrange(keys.WORKER_HEARTBEATS, 0, -1, withscores=True)
        assert len(owners) == 2, (
            f"two live workers, partitions held by {len(owners)}: {holders}; "
            f"heartbeats {heartbeats}"
        )
    finally:
        stack.stop()

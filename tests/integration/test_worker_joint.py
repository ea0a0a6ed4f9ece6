"""The worker's joint loop on one server: every steady partition read with one XREADGROUP and
applied in one pipeline; a partition that fails goes back to its own loop and returns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from services.core import keys
from services.core.actions import ACTION_FIELD, WebsocketSend, encode_action
from services.core.redis_client import create_redis
from services.core.scripts import Scripts
from services.core.settings import Settings, load_settings
from services.core.tasks import TaskStore
from services.worker.callbacks import CallbackEffects
from services.worker.joint import JointConsumer
from services.worker.metrics import TenantLabels
from services.worker.partition import PartitionConsumer

from .test_worker_partition import FailOnce, logged, send

PARTITIONS = 3
BUG = "a bug in the joint loop"


def settings_for(redis_url: str) -> Settings:
    return load_settings(
        redis_url=redis_url, worker_sleep_seconds=0.05, callback_partitions=PARTITIONS
    )


async def add_sends(redis: Redis, partition: int, session: str, numbers: Iterable[int]) -> None:
    for n in numbers:
        await redis.xadd(keys.callback_stream(partition), {ACTION_FIELD: send(session, n)})


async def settled(redis: Redis) -> bool:
    for partition in range(PARTITIONS):
        groups = await redis.xinfo_groups(keys.callback_stream(partition))
        if not groups or groups[0]["pending"] or groups[0]["lag"]:
            return False
    return True


@asynccontextmanager
async def joint_worker(
    redis: Redis,
    settings: Settings,
    effects: CallbackEffects | None = None,
    leases: dict[int, bool] | None = None,
) -> AsyncIterator[tuple[JointConsumer, list[PartitionConsumer]]]:
    """One consumer per partition, all joined to one joint loop (as `Worker` runs them).
    `leases`: whether each partition's lease surely holds (all, when not given)."""
    held = leases if leases is not None else dict.fromkeys(range(PARTITIONS), True)
    joint_redis = create_redis(settings, max_connections=2, retries=0)
    joint = JointConsumer(joint_redis, settings, "w1")
    scripts = Scripts(redis)
    await scripts.load()
    tasks = TaskStore(redis, scripts, settings)
    effects = effects or CallbackEffects(tasks, scripts, settings)
    consumers = [
        PartitionConsumer(
            redis,
            effects,
            tasks,
            settings,
            "w1",
            p,
            TenantLabels(5),
            lease_valid=lambda p=p: held[p],  # type: ignore[misc]
            joint=joint,
        )
        for p in range(PARTITIONS)
    ]
    running = [asyncio.create_task(consumer.run()) for consumer in consumers]
    try:
        yield joint, consumers
    finally:
        for consumer in consumers:
            consumer.stop()
        for outcome in await asyncio.gather(*running, return_exceptions=True):
            if isinstance(outcome, BaseException) and str(outcome) != BUG:
                raise outcome  # BUG: the joint loop's, raised in each partition on purpose
        await joint_redis.aclose()


async def wait_until(condition: object, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_partitions_are_read_together_and_each_session_keeps_its_order(
    redis: Redis, redis_url: str
) -> None:
    settings = settings_for(redis_url)
    async with joint_worker(redis, settings) as (joint, _):
        await wait_until(lambda: _joined(joint, PARTITIONS))
        applied_together: list[set[int]] = []
        real_apply = joint._apply

        async def recording_apply(members: list[PartitionConsumer], entries: dict) -> None:  # type: ignore[type-arg]
            applied_together.append(set(entries))
            await real_apply(members, entries)

        joint._apply = recording_apply  # type: ignore[method-assign]
        async with redis.pipeline(transaction=False) as pipe:  # one burst over all partitions
            for n in range(1, 31):
                action = WebsocketSend(tenant_id="acme", session_id=f"s{n % 3}", message={"n": n})
                pipe.xadd(keys.callback_stream(n % 3), {ACTION_FIELD: encode_action(action)})
            await pipe.execute()
        await wait_until(lambda: settled(redis))

    for session in range(3):
        assert await logged(redis, f"s{session}") == [n for n in range(1, 31) if n % 3 == session]
    # The blocked read returns with the burst's first entry; the read that came with its
    # effects found the three partitions' entries, applied in one pipeline.
    assert {0, 1, 2} in applied_together


async def test_a_partition_whose_batch_failed_retries_alone_then_joins_again(
    redis: Redis, redis_url: str
) -> None:
    settings = settings_for(redis_url)
    scripts = Scripts(redis)
    effects = FailOnce(TaskStore(redis, scripts, settings), scripts, settings)
    async with joint_worker(redis, settings, effects) as (joint, _):
        await wait_until(lambda: _joined(joint, PARTITIONS))
        await add_sends(redis, 0, "s0", [1, 2, 3, 4])  # 2 fails once
        await add_sends(redis, 1, "s1", [1, 2, 3])
        await add_sends(redis, 2, "s2", [5, 6])
        await wait_until(lambda: settled(redis))
        await wait_until(lambda: _joined(joint, PARTITIONS))

    assert effects.failed
    assert await logged(redis, "s0") == [1, 2, 3, 4]  # 3 and 4 did not overtake 2
    assert await logged(redis, "s1") == [1, 2, 3]
    assert await logged(redis, "s2") == [5, 6]


async def test_a_lost_connection_sends_every_partition_back_and_loses_nothing(
    redis: Redis, redis_url: str
) -> None:
    settings = settings_for(redis_url)
    async with joint_worker(redis, settings) as (joint, _):
        await wait_until(lambda: _joined(joint, PARTITIONS))
        for n in range(1, 41):
            await add_sends(redis, n % 3, f"s{n % 3}", [n])
            if n % 10 == 0:  # the joint loop's connection dies under it
                await redis.client_kill_filter(_type="normal", skipme=True, laddr=None)
        await wait_until(lambda: settled(redis))

    for session in range(3):
        assert await logged(redis, f"s{session}") == [n for n in range(1, 41) if n % 3 == session]


async def _joined(joint: JointConsumer, count: int) -> bool:
    return len(joint._members) == count and not joint._leaving


async def test_a_partition_whose_lease_is_in_doubt_applies_nothing_until_it_holds_again(
    redis: Redis, redis_url: str
) -> None:
    settings = settings_for(redis_url)
    leases = dict.fromkeys(range(PARTITIONS), True)
    async with joint_worker(redis, settings, leases=leases) as (joint, _):
        await wait_until(lambda: _joined(joint, PARTITIONS))
        leases[1] = False  # its renewal did not come back in time: another worker may own it
        for partition in range(PARTITIONS):
            await add_sends(redis, partition, f"s{partition}", [1, 2])

        async def others_applied() -> bool:
            return await logged(redis, "s0") == [1, 2] and await logged(redis, "s2") == [1, 2]

        await wait_until(others_applied)
        assert await logged(redis, "s1") == []
        assert 1 not in joint._members

        leases[1] = True
        await wait_until(lambda: settled(redis))
        await wait_until(lambda: _joined(joint, PARTITIONS))
    assert await logged(redis, "s1") == [1, 2]


async def test_a_stopped_partition_leaves_while_the_others_go_on(
    redis: Redis, redis_url: str
) -> None:
    settings = settings_for(redis_url)
    async with joint_worker(redis, settings) as (joint, consumers):
        await wait_until(lambda: _joined(joint, PARTITIONS))
        consumers[2].stop()  # its lease was lost, or the worker stops it
        await wait_until(lambda: _joined(joint, PARTITIONS - 1), timeout=5)
        assert 2 not in joint._members
        await add_sends(redis, 0, "s0", [1, 2, 3])
        await add_sends(redis, 1, "s1", [4])

        async def applied() -> bool:
            return await logged(redis, "s0") == [1, 2, 3] and await logged(redis, "s1") == [4]

        await wait_until(applied)


async def test_under_load_acks_go_in_batches_and_all_of_them_in_the_end(
    redis: Redis, redis_url: str
) -> None:
    settings = settings_for(redis_url)
    async with joint_worker(redis, settings) as (joint, _):
        await wait_until(lambda: _joined(joint, PARTITIONS))
        before = await _calls(redis, "xack")
        for n in range(1, 91):  # one at a time: rounds of one or two entries
            await add_sends(redis, n % 3, f"s{n % 3}", [n])
        await wait_until(lambda: settled(redis))  # nothing left pending: all acknowledged
        xacks = await _calls(redis, "xack") - before

    for session in range(3):
        assert await logged(redis, f"s{session}") == [n for n in range(1, 91) if n % 3 == session]
    # One XACK per partition and round would be ~90; lazily, one per 32 entries of a
    # partition or per 0.2 s, and those of a loop going idle.
    assert xacks < 30


async def _calls(redis: Redis, command: str) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_bug_in_the_joint_loop_reaches_every_partitions_own_loop(
    redis: Redis, redis_url: str
) -> None:
    settings = settings_for(redis_url)
    async with joint_worker(redis, settings) as (joint, _):
        await wait_until(lambda: _joined(joint, PARTITIONS))

        async def broken_apply(*_: object) -> None:
            raise RuntimeError(BUG)

        joint._apply = broken_apply  # type: ignore[method-assign]
        await add_sends(redis, 0, "s0", [1])
        await wait_until(lambda: _no_members(joint))
        assert joint._task is not None
        assert joint._task.done()
        assert isinstance(joint._task.exception(), RuntimeError)


async def _no_members(joint: JointConsumer) -> bool:
    return not joint._members and not joint._joining

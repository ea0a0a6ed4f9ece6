"""Consumed stream entries are released: `trim_consumed` (services/core/lua/trim_consumed.lua)
and the worker's trimmer. Before, every acknowledged entry stayed until the stream's MAXLEN (a
million entries), whatever every group had read.

Entries here are larger than a stream node's byte bound (`stream-node-max-bytes`, 4096), so
each is a node of its own and the node-wise trim (`MINID ~`) is exact, entry by entry.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from services.cli.embedded import LocalCluster
from services.core import keys
from services.core.actions import ACTION_FIELD
from services.core.redis_client import create_redis
from services.core.settings import load_settings
from services.core.streams import trim_consumed
from services.worker.main import Worker
from tests.integration.test_worker_partition import sampled_lag
from tests.integration.worker_helpers import add_send, wait_for

STREAM = keys.aes_stream("normal")
BIG = b"x" * 5000  # one entry per stream node


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _add(redis: Redis, count: int, stream: str = STREAM) -> list[str]:
    return [_text(await redis.xadd(stream, {ACTION_FIELD: BIG})) for _ in range(count)]


async def _read(redis: Redis, group: str, count: int, stream: str = STREAM) -> list[str]:
    reply = await redis.xreadgroup(group, "c1", {stream: ">"}, count=count)
    return [_text(entry_id) for _, entries in reply for entry_id, _ in entries]


async def _ids(redis: Redis, stream: str = STREAM) -> list[str]:
    return [_text(entry_id) for entry_id, _ in await redis.xrange(stream)]


async def _group(redis: Redis, name: str, stream: str = STREAM) -> dict[str, object]:
    groups = await redis.xinfo_groups(stream)
    return next(info for info in groups if _text(info["name"]) == name)


async def test_entries_every_group_acknowledged_go_and_the_rest_stay(redis: Redis) -> None:
    """Group `aes` acknowledged all; group `other` read 6, acknowledged the first 3 and holds
    3 pending: the 3 both acknowledged go; the pending and the unread stay."""
    ids = await _add(redis, 10)
    await redis.xgroup_create(STREAM, keys.AES_GROUP, id="0")
    await redis.xgroup_create(STREAM, "other", id="0")
    await redis.xack(STREAM, keys.AES_GROUP, *await _read(redis, keys.AES_GROUP, 10))
    read = await _read(redis, "other", 6)
    await redis.xack(STREAM, "other", *read[:3])

    assert await trim_consumed(redis, STREAM) == 3

    assert await _ids(redis) == ids[3:]
    await redis.xack(STREAM, "other", *read[3:])
    assert await trim_consumed(redis, STREAM) == 3  # the read ones, once acknowledged
    assert await _ids(redis) == ids[6:]  # never read by `other`


async def test_an_external_group_keeps_what_it_has_not_acknowledged(redis: Redis) -> None:
    """An external AES reading the AES streams with a group of its own name: nothing goes
    until it reads and acknowledges, however far our own group is."""
    ids = await _add(redis, 4)
    await redis.xgroup_create(STREAM, keys.AES_GROUP, id="0")
    await redis.xgroup_create(STREAM, "external-aes", id="0")
    await redis.xack(STREAM, keys.AES_GROUP, *await _read(redis, keys.AES_GROUP, 10))

    assert await trim_consumed(redis, STREAM) == 0
    assert await _ids(redis) == ids
    await redis.xack(STREAM, "external-aes", *await _read(redis, "external-aes", 2))
    assert await trim_consumed(redis, STREAM) == 2
    assert await _ids(redis) == ids[2:]


async def test_a_stream_without_groups_or_without_entries_is_left_alone(redis: Redis) -> None:
    ids = await _add(redis, 3, keys.CANCEL_STREAM)  # read with XREAD by every executor

    assert await trim_consumed(redis, keys.CANCEL_STREAM) == 0
    assert await trim_consumed(redis, "{aes}:nothing-here") == 0
    assert await _ids(redis, keys.CANCEL_STREAM) == ids


async def test_a_group_moved_back_below_its_pending_entries_keeps_them(redis: Redis) -> None:
    """XGROUP SETID back to 0 (an operator replaying) after a read: the position is the lower
    bound, so nothing goes although entries are pending above it."""
    ids = await _add(redis, 3)
    await redis.xgroup_create(STREAM, keys.AES_GROUP, id="0")
    await _read(redis, keys.AES_GROUP, 3)
    await redis.xgroup_setid(STREAM, keys.AES_GROUP, "0")

    assert await trim_consumed(redis, STREAM) == 0
    assert await _ids(redis) == ids


async def test_ids_beyond_a_lua_numbers_precision_are_compared_exactly(redis: Redis) -> None:
    """Ids are compared and incremented as decimal strings: sequence numbers up to 2^64-1,
    a carry over `...99`, and the id after the largest sequence of a millisecond."""
    top = 2**64 - 1
    ids = ["5-99", f"5-{2**53}", f"5-{2**53 + 1}", f"5-{top}", "6-0"]
    for entry_id in ids:
        await redis.xadd(STREAM, {ACTION_FIELD: BIG}, id=entry_id)
    await redis.xgroup_create(STREAM, keys.AES_GROUP, id="0")

    for done, kept in ((1, ids[1:]), (2, ids[2:]), (4, ids[4:])):
        await redis.xgroup_setid(STREAM, keys.AES_GROUP, ids[done - 1])  # read, nothing pending
        await trim_consumed(redis, STREAM)
        assert await _ids(redis) == kept


async def test_lag_stays_exact_after_a_trim(redis: Redis, redis_url: str) -> None:
    """Trimming by MINID leaves max-deleted-entry-id alone: XINFO GROUPS still knows the lag
    (which the stream-lag gauge and the autoscaler read), unlike XDEL."""
    stream = keys.callback_stream(0)
    await _add(redis, 6, stream)
    await redis.xgroup_create(stream, keys.WORKER_GROUP, id="0")
    await redis.xack(stream, keys.WORKER_GROUP, *await _read(redis, keys.WORKER_GROUP, 4, stream))
    await _add(redis, 1, stream)

    assert await trim_consumed(redis, stream) == 4

    group = await _group(redis, keys.WORKER_GROUP, stream)
    assert group["lag"] == 3
    assert group["entries-read"] == 4
    assert await sampled_lag(redis_url, stream) == 3


async def test_the_worker_releases_what_it_and_the_aes_consumed(
    redis: Redis, redis_url: str
) -> None:
    """A running worker trims its partition (entries it applied and acknowledged) and the AES
    streams (entries the AES group acknowledged), and keeps the AES's unread entry."""
    for n in range(5):
        await add_send(redis, 0, "acme", "s1", n)
    await redis.xgroup_create(STREAM, keys.AES_GROUP, id="0", mkstream=True)
    await _add(redis, 3)
    await redis.xack(STREAM, keys.AES_GROUP, *await _read(redis, keys.AES_GROUP, 3))
    unread = await _add(redis, 1)

    async def released() -> bool:
        return await redis.xlen(keys.callback_stream(0)) == 0 and await _ids(redis) == unread

    worker = Worker(
        load_settings(redis_url=redis_url, callback_partitions=1, worker_sleep_seconds=0.05)
    )
    worker.trim_seconds = 0.1
    running = asyncio.create_task(worker.run())
    try:
        await wait_for(released, 15)
    finally:
        worker.stopping.set()
        await running
    group = await _group(redis, keys.WORKER_GROUP, keys.callback_stream(0))
    assert group["pending"] == 0
    assert group["lag"] == 0


async def test_the_trim_runs_on_a_cluster(redis_cluster: LocalCluster) -> None:
    """One key per call: the script goes to the stream's node, for streams on other slots."""
    client = create_redis(load_settings(redis_url=redis_cluster.url, redis_mode="cluster"))
    streams = [keys.callback_stream(p) for p in range(3)] + [STREAM]
    try:
        for stream in streams:
            await client.delete(stream)
            await _add(client, 2, stream)
            await client.xgroup_create(stream, keys.WORKER_GROUP, id="0")
            await client.xack(
                stream, keys.WORKER_GROUP, *await _read(client, keys.WORKER_GROUP, 1, stream)
            )

        assert [await trim_consumed(client, stream) for stream in streams] == [1, 1, 1, 1]
    finally:
        for stream in streams:  # the cluster lives for the whole test session
            await client.delete(stream)
        await client.aclose()

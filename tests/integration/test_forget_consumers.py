"""Consumers of a group are deleted once they hold nothing (named after their pod, a group
otherwise keeps one per pod that ever lived), never while they hold a pending entry."""

from __future__ import annotations

from redis.asyncio import Redis

from services.core.streams import forget_consumers

STREAM, GROUP = "{t}:stream", "g"


async def names(redis: Redis) -> set[str]:
    return {c["name"].decode() for c in await redis.xinfo_consumers(STREAM, GROUP)}


async def three_consumers(redis: Redis) -> None:
    """`holder` holds one pending entry; `done` acknowledged its entry; `idle` read nothing."""
    await redis.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
    for consumer in ("holder", "done"):
        await redis.xadd(STREAM, {"n": consumer})
        [[_, [(entry_id, _)]]] = await redis.xreadgroup(GROUP, consumer, {STREAM: ">"})
        if consumer == "done":
            await redis.xack(STREAM, GROUP, entry_id)
    await redis.xreadgroup(GROUP, "idle", {STREAM: ">"})


async def test_a_consumer_holding_an_entry_is_kept_the_others_go(redis: Redis) -> None:
    await three_consumers(redis)
    assert await forget_consumers(redis, STREAM, GROUP, keep="idle") == 1
    assert await names(redis) == {"holder", "idle"}
    assert await forget_consumers(redis, STREAM, GROUP, only="holder") == 0
    assert await forget_consumers(redis, STREAM, GROUP, only="idle") == 1
    assert await names(redis) == {"holder"}
    pending = await redis.xpending(STREAM, GROUP)
    assert pending["pending"] == 1  # its entry is still pending, still its


async def test_only_consumers_idle_long_enough_go(redis: Redis) -> None:
    await three_consumers(redis)
    assert await forget_consumers(redis, STREAM, GROUP, idle_seconds=3600) == 0
    assert await names(redis) == {"holder", "done", "idle"}


async def test_a_missing_stream_or_group_deletes_nothing(redis: Redis) -> None:
    assert await forget_consumers(redis, "{t}:none", GROUP) == 0
    await redis.xadd(STREAM, {"n": 1})
    assert await forget_consumers(redis, STREAM, "no-group") == 0

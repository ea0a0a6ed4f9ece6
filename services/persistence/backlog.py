"""How many finished tasks wait for PostgreSQL, asked of Redis.

A module of its own, without the writer's metrics: the api reports the backlog on
`/health/detailed`, and importing the writer made every api pod export the writer's
counters and gauge, at 0 for ever, beside the workers' real ones.
"""

from __future__ import annotations

from redis.asyncio import Redis

from services.core import keys


async def backlog(redis: Redis) -> int:
    """Records not yet written: never delivered to a writer (lag) plus delivered, unacked.

    Falls back to the stream's length (it holds only unwritten entries) when Redis cannot
    tell the lag. 0 when the stream does not exist yet.
    """
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xinfo_groups(keys.PERSIST_RECORDS)
        pipe.xlen(keys.PERSIST_RECORDS)
        groups, length = await pipe.execute(raise_on_error=False)
    if isinstance(length, BaseException):
        raise length
    if isinstance(groups, BaseException):
        return int(length)
    for group in groups:
        name = group.get("name")
        if (name.decode() if isinstance(name, bytes) else name) != keys.PERSIST_GROUP:
            continue
        lag = group.get("lag")
        if lag is None:
            return int(length)
        return int(lag) + int(group.get("pending") or 0)
    return int(length)

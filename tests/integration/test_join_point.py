"""`session_log.join_point`: where a new socket starts (README "Event ids and resume"), read
before its handshake completes, on a real Redis."""

from __future__ import annotations

import gc
import weakref

from redis.asyncio import Redis

from services.api import session_log
from services.core import keys
from services.core.events import parse_event_id


async def test_a_join_is_after_what_the_log_holds_and_before_what_comes_next(
    redis: Redis, redis_url: str
) -> None:
    """No log yet: a join mark, below the first event appended after it. A log: its newest
    event. After SCRIPT FLUSH (a restarted server) the script is loaded again."""
    log = keys.session_log("jp", "s1")
    mark = await session_log.join_point(redis, "jp", "s1")
    first = (await redis.xadd(log, {"e": "{}"})).decode()
    assert parse_event_id(mark) < parse_event_id(first)
    assert await session_log.join_point(redis, "jp", "s1") == first
    await redis.script_flush()
    second = (await redis.xadd(log, {"e": "{}"})).decode()
    assert await session_log.join_point(redis, "jp", "s1") == second


async def test_a_closed_client_is_not_kept_alive_by_a_join(redis_url: str) -> None:
    """A client that served joins and was closed is freed: a cache of a script object per
    client (f6a33ae) kept each one alive for ever (found by the review of that change)."""
    refs = []
    for n in range(3):
        client = Redis.from_url(redis_url)
        await session_log.join_point(client, "jp", f"s{n}")
        await client.aclose()
        refs.append(weakref.ref(client))
        del client
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0

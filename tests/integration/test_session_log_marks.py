"""The join mark: the cursor of a socket that joins a session without a log (session_log.py).

The server used to hand out `0-0` there, and a resume from `0-0` on a missing log, or on a log
from which nothing was removed, was called exact: a client away longer than the log's ttl, whose
answer came and expired meanwhile (or a new log started after it), was told `resumed: true`
and never learned that it missed an answer."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from services.api.session_log import read_since
from services.core import keys
from services.core.events import parse_event_id

TENANT, SESSION = "acme", "s1"
LOG = keys.session_log(TENANT, SESSION)
TTL_MS = 200  # the log's ttl as the api is told it (ORCHESTRATOR_SESSION_LOG_TTL_SECONDS)


async def join(redis: Redis) -> str:
    joined = await read_since(redis, TENANT, SESSION, None, log_ttl_ms=TTL_MS)
    assert joined.resumed is None
    assert joined.cursor != "0-0"
    return joined.cursor


async def resume(redis: Redis, cursor: str) -> tuple[bool | None, list[str]]:
    replay = await read_since(redis, TENANT, SESSION, cursor, log_ttl_ms=TTL_MS)
    return replay.resumed, [body for _, body in replay.events]


async def test_a_mark_resumes_every_event_of_a_log_that_started_after_it(redis: Redis) -> None:
    mark = await join(redis)
    assert await resume(redis, mark) == (True, [])  # nothing happened
    for n in (1, 2):
        await redis.xadd(LOG, {"e": f"event {n}"})
    assert await resume(redis, mark) == (True, ["event 1", "event 2"])


async def test_a_mark_older_than_the_logs_ttl_is_refused_whatever_the_log_now_holds(
    redis: Redis,
) -> None:
    mark = await join(redis)
    await redis.xadd(LOG, {"e": "the answer the client never saw"})
    await redis.delete(LOG)  # it expired, ...
    await asyncio.sleep(TTL_MS / 1000 + 0.05)  # ... which takes a ttl: the clock is the event
    assert (await resume(redis, mark))[0] is False
    await redis.xadd(LOG, {"e": "a new log"})  # a new message starts the log again
    assert (await resume(redis, mark))[0] is False


async def test_a_mark_on_a_trimmed_log_is_refused(redis: Redis) -> None:
    mark = await join(redis)
    for n in range(5):
        await redis.xadd(LOG, {"e": f"event {n}"})
    await redis.xtrim(LOG, maxlen=2, approximate=False)
    assert (await resume(redis, mark))[0] is False


async def test_a_client_asking_for_everything_with_zero_gets_a_mark_to_keep(
    redis: Redis,
) -> None:
    """`0-0` is a client's "from the start": answered as before, but the cursor it gets back
    is a mark, so its next resume can be proven or refused."""
    replay = await read_since(redis, TENANT, SESSION, "0-0", log_ttl_ms=TTL_MS)
    assert replay.resumed is True
    assert replay.cursor != "0-0"


class AppendsDuringTime(Redis):
    """A client whose TIME reaches the server just after another client's first event on the
    log, a millisecond later: the interleaving of two round trips that lost that event."""

    async def time(self) -> tuple[int, int]:  # type: ignore[override]
        async with Redis(connection_pool=self.connection_pool) as other:
            await other.xadd(LOG, {"e": "the first event"})
        appended = await self._ms()
        while await self._ms() == appended:
            pass  # until the server's clock is a millisecond on
        return await super().time()

    async def _ms(self) -> int:
        seconds, micros = await super().time()
        return seconds * 1000 + micros // 1000


async def test_a_first_event_appended_while_joining_is_not_below_the_cursor(
    redis: Redis, redis_url: str
) -> None:
    """The log was read, then the time: a first event appended between the two was older than
    the join mark made of that time, so the socket dropped it as already sent, and a resume
    from an earlier mark said exact. The time is read first now (on one server in the same
    round trip as the log: nothing can come between, and this client's TIME is not called)."""
    mark = await join(redis)
    racing = AppendsDuringTime.from_url(redis_url)
    try:
        replay = await read_since(racing, TENANT, SESSION, mark, log_ttl_ms=60_000)
    finally:
        await racing.aclose()
    logged = [(i.decode(), f[b"e"].decode()) for i, f in await redis.xrange(LOG)]
    missed = [
        body
        for event_id, body in logged
        if parse_event_id(event_id) <= parse_event_id(replay.cursor)
        and body not in [b for _, b in replay.events]
    ]
    assert replay.resumed is True
    assert missed == [], f"cursor {replay.cursor} is past {logged}, which was not replayed"

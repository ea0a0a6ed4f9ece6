"""A resume reads the session log in pages (session_log.py `REPLAY_PAGE`): in one read, a
resume far back in a long log held the api's event loop for every other client of the pod
(1-2.5 s at 100 000-200 000 events; found by the review of stored data at scale). Between
two pages the log may be trimmed past the cursor: a gap, told as after an outage."""

from __future__ import annotations

from redis.asyncio import Redis

from services.api.session_log import read_page, read_since
from services.core import keys

TENANT, SESSION = "acme", "long"
LOG = keys.session_log(TENANT, SESSION)


async def fill(redis: Redis, count: int) -> list[str]:
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(count):
            pipe.xadd(LOG, {"e": f"event {n}"})
        return [entry_id.decode() for entry_id in await pipe.execute()]


async def test_pages_give_every_event_once_in_order(redis: Redis) -> None:
    ids = await fill(redis, 25)
    first = await read_since(redis, TENANT, SESSION, "0-0", page=10)
    assert first.resumed is True
    assert first.more
    got = list(first.events)
    cursor = first.cursor
    pages = 1
    more = first.more
    while more:
        page = await read_page(redis, TENANT, SESSION, cursor, page=10)
        assert not page.gap
        got += page.events
        cursor = page.events[-1][0] if page.events else cursor
        more, pages = page.more, pages + 1
    assert [event_id for event_id, _ in got] == ids
    assert [body for _, body in got] == [f"event {n}" for n in range(25)]
    assert pages == 3


async def test_a_full_last_page_ends_with_an_empty_one(redis: Redis) -> None:
    ids = await fill(redis, 10)
    first = await read_since(redis, TENANT, SESSION, "0-0", page=10)
    assert first.more
    page = await read_page(redis, TENANT, SESSION, ids[-1], page=10)
    assert (page.events, page.more, page.gap) == ([], False, False)


async def test_a_trim_past_the_cursor_between_pages_is_a_gap(redis: Redis) -> None:
    ids = await fill(redis, 30)
    first = await read_since(redis, TENANT, SESSION, "0-0", page=10)
    assert first.cursor == ids[9]
    await redis.xtrim(LOG, maxlen=5, approximate=False)  # the session went on meanwhile
    page = await read_page(redis, TENANT, SESSION, first.cursor, page=10)
    assert page.gap
    assert [event_id for event_id, _ in page.events] == ids[25:]  # what the log still holds


async def test_a_log_gone_between_pages_is_a_gap(redis: Redis) -> None:
    ids = await fill(redis, 12)
    await redis.delete(LOG)  # erased, or expired
    page = await read_page(redis, TENANT, SESSION, ids[9], page=10)
    assert (page.events, page.more, page.gap) == ([], False, True)


async def test_a_trim_that_keeps_the_cursor_is_no_gap(redis: Redis) -> None:
    ids = await fill(redis, 30)
    await redis.xtrim(LOG, minid=ids[9], approximate=False)  # the cursor's own entry stays
    page = await read_page(redis, TENANT, SESSION, ids[9], page=10)
    assert not page.gap
    assert [event_id for event_id, _ in page.events] == ids[10:20]

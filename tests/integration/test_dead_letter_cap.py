"""The dead-letter stream is capped (a bug dead-lettering every action must not fill Redis):
what goes past the cap was deleted in silence, never replayed nor discarded (found by the
review of stored data at scale: 100 500 dead letters and one more lost 493 of the oldest)."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.core import keys, streams
from services.core.actions import ACTION_FIELD
from services.core.streams import DEAD_LETTER_MAXLEN, Entry, dead_letter
from tests.integration.test_worker_deadletter_flow import cli


def dropped_so_far() -> float:
    return REGISTRY.get_sample_value("orchestrator_dead_letters_dropped_total") or 0.0


async def fill(redis: Redis, count: int) -> None:
    record = {"stream": "s", "entry_id": "1-0", "group": "g", "reason": "r", "at": "t"}
    for start in range(0, count, 10_000):
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(start, min(start + 10_000, count)):
                pipe.xadd(keys.DEAD_LETTERS, {**record, ACTION_FIELD: b"{}"})
            await pipe.execute()


async def test_dead_letters_dropped_at_the_cap_are_counted_and_logged(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await redis.delete(keys.DEAD_LETTERS, "{cb:0}:callbacks")
    await fill(redis, DEAD_LETTER_MAXLEN + 500)
    await redis.xgroup_create("{cb:0}:callbacks", "g", id="0", mkstream=True)
    entry_id = await redis.xadd("{cb:0}:callbacks", {ACTION_FIELD: b"not json"})
    await redis.xreadgroup("g", "c", {"{cb:0}:callbacks": ">"})
    entry = Entry("{cb:0}:callbacks", entry_id.decode(), {ACTION_FIELD.encode(): b"not json"})
    before = dropped_so_far()
    with caplog.at_level(logging.WARNING, logger=streams.__name__):
        await dead_letter(redis, entry, "g", "malformed action")
    gone = DEAD_LETTER_MAXLEN + 501 - await redis.xlen(keys.DEAD_LETTERS)
    assert gone > 0, "the cap did not trim: the test fills too little"
    assert dropped_so_far() - before == gone
    [line] = [r for r in caplog.records if "dead-letter stream full" in r.getMessage()]
    assert line.levelno == logging.ERROR
    assert str(gone) in line.getMessage()
    # The new dead letter is kept, and its entry acknowledged.
    newest = await redis.xrevrange(keys.DEAD_LETTERS, count=1)
    assert newest[0][1][b"entry_id"] == entry_id
    assert (await redis.xpending("{cb:0}:callbacks", "g"))["pending"] == 0
    await redis.delete(keys.DEAD_LETTERS, "{cb:0}:callbacks")


async def test_below_the_cap_nothing_is_dropped(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await redis.delete(keys.DEAD_LETTERS)
    await fill(redis, 10)
    entry = Entry("{cb:0}:callbacks", "1-1", {ACTION_FIELD.encode(): b"x"})
    before = dropped_so_far()
    with caplog.at_level(logging.WARNING, logger=streams.__name__):
        await dead_letter(redis, entry, "g", "malformed action")
    assert await redis.xlen(keys.DEAD_LETTERS) == 11
    assert dropped_so_far() == before
    assert not [r for r in caplog.records if "dead-letter stream full" in r.getMessage()]
    await redis.delete(keys.DEAD_LETTERS)


async def test_dead_letters_beyond_the_limit_can_be_listed_page_by_page(
    redis: Redis, redis_url: str
) -> None:
    """`deadletters list` showed the oldest `--limit` and no way on: the rest could only be
    seen by listing everything at once (100 000 at the cap)."""
    await fill(redis, 5)
    ids = [entry_id.decode() for entry_id, _ in await redis.xrange(keys.DEAD_LETTERS)]
    first = cli(redis_url, "list", "--limit", "2")
    assert first.returncode == 0, first.stderr
    assert f"next page: orchestrator deadletters list --limit 2 --after {ids[1]}" in first.stdout
    second = cli(redis_url, "list", "--limit", "2", "--after", ids[1], "--json")
    assert second.returncode == 0, second.stderr
    assert [letter["id"] for letter in json.loads(second.stdout)] == ids[2:4]
    last = cli(redis_url, "list", "--limit", "2", "--after", ids[3])
    assert ids[4] in last.stdout
    assert "next page" not in last.stdout
    bad = cli(redis_url, "list", "--after", "yesterday")
    assert bad.returncode != 0
    assert "--after" in bad.stderr


async def test_the_newest_dead_letters_are_one_command_away(redis: Redis, redis_url: str) -> None:
    """At the cap the stream holds 100 000 dead letters: `list` showed the 100 oldest (the
    ones being dropped) and what keeps failing now was 1 000 pages of `--after` away."""
    await fill(redis, 5)
    await redis.xadd(
        keys.DEAD_LETTERS,
        {"stream": "s", "entry_id": "1-0", "group": "g", "reason": "what fails now",
         "at": "t", ACTION_FIELD: b"{}"},
    )  # fmt: skip
    ids = [entry_id.decode() for entry_id, _ in await redis.xrange(keys.DEAD_LETTERS)]
    newest = cli(redis_url, "list", "--newest", "--limit", "2", "--json")
    assert newest.returncode == 0, newest.stderr
    assert [letter["id"] for letter in json.loads(newest.stdout)] == ids[-2:]  # oldest first
    table = cli(redis_url, "list", "--newest", "--limit", "2")
    assert "what fails now" in table.stdout
    assert "next page" not in table.stdout
    both = cli(redis_url, "list", "--newest", "--after", ids[0])
    assert both.returncode != 0
    assert "--newest" in both.stderr


async def test_the_page_holding_the_last_dead_letter_names_no_next_page(
    redis: Redis, redis_url: str
) -> None:
    """4 dead letters, `--limit 2`: the page after the second ended with a 'next page'
    command that listed nothing (found by the review of this session's changes)."""
    await fill(redis, 4)
    ids = [entry_id.decode() for entry_id, _ in await redis.xrange(keys.DEAD_LETTERS)]
    second = cli(redis_url, "list", "--limit", "2", "--after", ids[1])
    assert ids[3] in second.stdout
    assert "next page" not in second.stdout
    exact = cli(redis_url, "list", "--limit", "4")
    assert "next page" not in exact.stdout

"""Listing and replaying dead letters, on a real Redis, with entries dead-lettered the way the
worker and the executor do it (`streams.dead_letter` after a real XREADGROUP)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from services.core import keys
from services.core.actions import ACTION_FIELD, ExecutionChunk, encode_action
from services.core.deadletters import (
    ReplayOutcome,
    count_dead_letters,
    list_dead_letters,
    replay_all_dead_letters,
    replay_dead_letters,
)
from services.core.errors import InvalidInput
from services.core.streams import dead_letter, ensure_group, parse_read

GROUP = "workers"
ORIGIN = keys.callback_stream(3)
CREATED = datetime(2025, 1, 1, tzinfo=UTC)


def chunk(seq: int) -> bytes:
    """The same bytes for the same `seq`, so a replayed action can be compared with it."""
    action = ExecutionChunk(
        attempt=1,
        action_id=f"chunk-{seq}",
        created_at=CREATED,
        tenant_id="acme",
        session_id="s1",
        task_id="t1",
        seq=seq,
        delta=f"d{seq}",
    )
    return encode_action(action)


async def make_dead_letter(
    redis: Redis,
    raw_action: bytes | None,
    *,
    stream: str = ORIGIN,
    reason: str = "handler failed: boom",
) -> str:
    """Add an entry to `stream`, read it through the group, dead-letter it; its DLQ id."""
    await ensure_group(redis, stream, GROUP)
    fields: dict[FieldT, EncodableT] = (
        {ACTION_FIELD: raw_action} if raw_action is not None else {"junk": b"x"}
    )
    await redis.xadd(stream, fields)
    [entry] = parse_read(await redis.xreadgroup(GROUP, "c1", {stream: ">"}, count=1))
    await dead_letter(redis, entry, GROUP, reason)
    return (await list_dead_letters(redis))[-1].id


async def read_new(redis: Redis, stream: str) -> list[bytes]:
    """The actions the group has not been given yet, as a consumer of `stream` reads them."""
    reply = await redis.xreadgroup(GROUP, "c2", {stream: ">"}, count=100)
    return [entry.fields[ACTION_FIELD.encode()] for entry in parse_read(reply)]


async def test_list_shows_each_dead_letter_with_its_origin_reason_and_action_type(
    redis: Redis,
) -> None:
    first = await make_dead_letter(redis, chunk(1), reason="handler failed: boom")
    second = await make_dead_letter(redis, b"{not json", reason="malformed action: bad")
    third = await make_dead_letter(redis, None, reason="stream entry has no 'action' field")

    letters = await list_dead_letters(redis)

    assert [letter.id for letter in letters] == [first, second, third]
    assert [letter.stream for letter in letters] == [ORIGIN] * 3
    assert [letter.group for letter in letters] == [GROUP] * 3
    assert [letter.reason for letter in letters] == [
        "handler failed: boom",
        "malformed action: bad",
        "stream entry has no 'action' field",
    ]
    assert [letter.action_type for letter in letters] == ["execution.chunk", None, None]
    assert [letter.action for letter in letters] == [chunk(1), b"{not json", b""]
    assert [letter.replayable for letter in letters] == [True, True, False]
    assert all(letter.at.endswith("Z") for letter in letters)


async def test_list_limit_gives_the_oldest_dead_letters_and_count_gives_them_all(
    redis: Redis,
) -> None:
    ids = [await make_dead_letter(redis, chunk(seq)) for seq in range(1, 6)]

    assert [letter.id for letter in await list_dead_letters(redis, limit=2)] == ids[:2]
    assert [letter.id for letter in await list_dead_letters(redis, after=ids[2])] == ids[3:]
    assert await count_dead_letters(redis) == 5


async def test_replaying_one_dead_letter_puts_the_same_action_back_on_its_origin_stream(
    redis: Redis,
) -> None:
    action = chunk(7)
    replayed_id = await make_dead_letter(redis, action)
    kept_id = await make_dead_letter(redis, chunk(8))

    [result] = await replay_dead_letters(redis, [replayed_id])

    assert result.outcome is ReplayOutcome.replayed
    assert result.stream == ORIGIN
    assert result.new_id is not None
    # The group that gave up on it is handed it again, byte for byte, as a new entry.
    assert await read_new(redis, ORIGIN) == [action]
    added = parse_read([(ORIGIN, await redis.xrange(ORIGIN, min=result.new_id, max="+"))])
    assert [(entry.id, entry.fields) for entry in added] == [
        (result.new_id, {ACTION_FIELD.encode(): action})
    ]
    # Gone from the dead letters; the other one is untouched.
    assert [letter.id for letter in await list_dead_letters(redis)] == [kept_id]


async def test_replay_all_requeues_every_dead_letter_in_order_and_empties_the_stream(
    redis: Redis,
) -> None:
    other = keys.aes_stream("normal")
    actions = [chunk(seq) for seq in range(1, 6)]
    ids = [await make_dead_letter(redis, action) for action in actions]
    elsewhere = await make_dead_letter(redis, b'{"action_type": "chat.process"}', stream=other)

    results = await replay_all_dead_letters(redis, batch=2)

    assert [result.id for result in results] == [*ids, elsewhere]
    assert all(result.outcome is ReplayOutcome.replayed for result in results)
    assert await read_new(redis, ORIGIN) == actions
    assert await read_new(redis, other) == [b'{"action_type": "chat.process"}']
    assert await count_dead_letters(redis) == 0


async def test_a_dead_letter_without_an_action_is_reported_and_kept(redis: Redis) -> None:
    empty = await make_dead_letter(redis, None)
    full = await make_dead_letter(redis, chunk(1))

    results = await replay_all_dead_letters(redis)

    assert [(result.id, result.outcome) for result in results] == [
        (empty, ReplayOutcome.not_replayable),
        (full, ReplayOutcome.replayed),
    ]
    assert results[0].detail == "it has no action to replay"
    assert [letter.id for letter in await list_dead_letters(redis)] == [empty]
    assert await read_new(redis, ORIGIN) == [chunk(1)]

    [again] = await replay_dead_letters(redis, [empty])
    assert again.outcome is ReplayOutcome.not_replayable
    assert await count_dead_letters(redis) == 1


async def test_an_unknown_id_is_reported_not_found_and_the_others_are_still_replayed(
    redis: Redis,
) -> None:
    known = await make_dead_letter(redis, chunk(1))

    results = await replay_dead_letters(redis, ["1-1", known, known])

    assert [(result.id, result.outcome) for result in results] == [
        ("1-1", ReplayOutcome.not_found),
        (known, ReplayOutcome.replayed),
    ]
    assert await read_new(redis, ORIGIN) == [chunk(1)]  # once, though named twice
    assert await count_dead_letters(redis) == 0


async def test_a_malformed_id_is_refused_before_anything_is_replayed(redis: Redis) -> None:
    known = await make_dead_letter(redis, chunk(1))

    with pytest.raises(InvalidInput, match="not a stream entry id"):
        await replay_dead_letters(redis, [known, "latest"])

    assert await count_dead_letters(redis) == 1
    assert await read_new(redis, ORIGIN) == []


async def test_a_dead_letter_whose_origin_refuses_the_entry_is_kept(redis: Redis) -> None:
    origin = "{cb:9}:callbacks"
    refused = await make_dead_letter(redis, chunk(1), stream=origin)
    accepted = await make_dead_letter(redis, chunk(2))
    await redis.delete(origin)
    await redis.set(origin, "no longer a stream")

    results = await replay_dead_letters(redis, [refused, accepted])

    assert [(result.id, result.outcome) for result in results] == [
        (refused, ReplayOutcome.failed),
        (accepted, ReplayOutcome.replayed),
    ]
    assert "WRONGTYPE" in (results[0].detail or "")
    assert [letter.id for letter in await list_dead_letters(redis)] == [refused]


async def test_replay_all_of_an_empty_dead_letter_stream_does_nothing(redis: Redis) -> None:
    assert await replay_all_dead_letters(redis) == []
    assert await list_dead_letters(redis) == []

"""Bad query input gets the documented errors: 400 for what cannot be parsed, 422 otherwise."""

from __future__ import annotations

import base64
from datetime import date

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.errors import BadRequest, InvalidInput
from services.persistence.batch import write_batch
from services.persistence.history import HistoryStore, parse_day
from tests.persistence.conftest import make_record


@pytest.fixture
async def history(engine: AsyncEngine) -> HistoryStore:
    async with engine.begin() as conn:
        await write_batch(conn, [make_record(f"t{i}", event_id=f"1-{i}") for i in range(3)])
    return HistoryStore(engine, page_max=100)


def forged(body: bytes, version: str = "v1.") -> str:
    return version + base64.urlsafe_b64encode(body).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "v1.",
        "v1.!!!!",
        forged(b"not json"),
        forged(b'["sideways","s1",1,0,0]'),
        forged(b'["before","s1",-1,0,0]'),
        forged(b'["before","s1",1,0,7]'),
        forged(b'["before","s1",9223372036854775808,0,0]'),  # beyond PostgreSQL's bigint
        forged(b'{"direction":"before"}'),
        "v1." + "A" * 600,
        "v2.",
        forged(b'["before","s1",1,0,0]', "v2."),  # a v1 body under v2
        forged(b'["before","s1",1,0,"t\\n",0]', "v2."),  # a task id no task has
        forged(b'["before","s1",1,0,"' + b"t" * 65 + b'",0]', "v2."),
        forged(b'["before","s1",1,0,"t1",0]', "v3."),
    ],
)
async def test_a_malformed_cursor_is_a_400(history: HistoryStore, cursor: str) -> None:
    with pytest.raises(BadRequest, match="malformed cursor") as caught:
        await history.messages("acme", "s1", cursor=cursor)
    assert caught.value.status == 400


async def test_a_cursor_issued_before_the_task_id_tiebreaker_still_pages(
    history: HistoryStore,
) -> None:
    """A `v1.` cursor (a client paging across the upgrade) keeps its meaning."""
    page = await history.messages("acme", "s1", cursor=forged(b'["before","s1",1,2,0]'))
    assert [(m.task_id, m.role) for m in page.messages] == [
        ("t0", "user"),
        ("t0", "assistant"),
        ("t1", "user"),
        ("t1", "assistant"),
    ]
    assert page.next_cursor is None


async def test_a_cursor_of_another_session_is_a_400(history: HistoryStore) -> None:
    page = await history.messages("acme", "s1", limit=2)
    assert page.next_cursor is not None
    with pytest.raises(BadRequest, match="another session"):
        await history.messages("acme", "s2", cursor=page.next_cursor)


@pytest.mark.parametrize(
    "event_id",
    [
        "",
        "abc",
        "1-",
        "-1",
        "1.5-2",
        "1-2-3",
        "\u00b2-1",  # a digit to str.isdigit, not to Redis
        f"{2**63}-0",  # a Redis id, beyond PostgreSQL's bigint
        f"1-{2**64}",  # beyond Redis's 64 bits
    ],
)
async def test_a_malformed_after_event_id_is_a_400(history: HistoryStore, event_id: str) -> None:
    with pytest.raises(BadRequest, match="after_event_id"):
        await history.messages("acme", "s1", after_event_id=event_id)


async def test_cursor_and_after_event_id_together_are_a_400(history: HistoryStore) -> None:
    page = await history.messages("acme", "s1", limit=2)
    assert page.next_cursor is not None
    with pytest.raises(BadRequest, match="either"):
        await history.messages("acme", "s1", cursor=page.next_cursor, after_event_id="1-0")


@pytest.mark.parametrize("limit", [0, -1, 101, 10_000])
async def test_a_page_size_outside_one_to_the_cap_is_a_422(
    history: HistoryStore, limit: int
) -> None:
    with pytest.raises(InvalidInput, match="between 1 and 100") as caught:
        await history.messages("acme", "s1", limit=limit)
    assert caught.value.status == 422
    assert caught.value.details == {"parameter": "limit", "max": 100}


async def test_from_after_to_is_a_422(history: HistoryStore) -> None:
    with pytest.raises(InvalidInput, match="from must not be after to") as caught:
        await history.usage("acme", date(2026, 3, 2), date(2026, 3, 1))
    assert caught.value.status == 422


async def test_a_usage_range_over_a_year_is_a_422(history: HistoryStore) -> None:
    with pytest.raises(InvalidInput, match="at most 366 days"):
        await history.usage("acme", date(2024, 1, 1), date(2026, 1, 1))


@pytest.mark.parametrize("value", ["", "2026-3-1", "yesterday", "2026-02-30", "20260301"])
def test_a_day_that_is_not_yyyy_mm_dd_is_a_422_naming_the_parameter(value: str) -> None:
    with pytest.raises(InvalidInput, match="from must be a date") as caught:
        parse_day(value, "from")
    assert caught.value.details == {"parameter": "from"}


@pytest.mark.parametrize("session_id", ["", "a b", "x" * 65, "../etc"])
async def test_an_invalid_session_id_is_a_422(history: HistoryStore, session_id: str) -> None:
    with pytest.raises(InvalidInput, match="session_id"):
        await history.messages("acme", session_id)

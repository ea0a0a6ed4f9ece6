"""Reading history back: newest last, cursor pages, `after_event_id`, status and usage."""

from __future__ import annotations

from datetime import date, timedelta

import msgspec
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.persistence.batch import write_batch
from services.persistence.history import PAGE_CHARS, HistoryMessage, HistoryStore
from services.persistence.records import PersistRecord
from tests.persistence.conftest import BASE_TIME, make_record

# Event ids whose string order differs from their numeric order.
EVENT_IDS = ["999-5", "1000-2", "1000-9", "1000-10", "1000-11", "10000-0", "10000-1"]


async def write(engine: AsyncEngine, records: list[PersistRecord]) -> None:
    async with engine.begin() as conn:
        await write_batch(conn, records)


@pytest.fixture
async def history(engine: AsyncEngine) -> HistoryStore:
    records = [make_record(f"task{i}", event_id=event) for i, event in enumerate(EVENT_IDS)]
    await write(engine, records[::-1])  # written in any order, read in event order
    return HistoryStore(engine, page_max=50)


def turns(found: list[HistoryMessage]) -> list[tuple[str, str]]:
    return [(message.task_id, message.role) for message in found]


ALL_TURNS = [(f"task{i}", role) for i in range(len(EVENT_IDS)) for role in ("user", "assistant")]


async def test_history_comes_newest_last_in_event_id_order(history: HistoryStore) -> None:
    page = await history.messages("acme", "s1", limit=50)
    assert turns(page.messages) == ALL_TURNS
    assert page.next_cursor is None


async def test_cursor_pages_walk_back_to_the_first_message_without_gaps_or_repeats(
    history: HistoryStore,
) -> None:
    pages: list[list[tuple[str, str]]] = []
    cursor = None
    while True:
        page = await history.messages("acme", "s1", limit=4, cursor=cursor)
        pages.append(turns(page.messages))
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages[0] == ALL_TURNS[-4:]
    assert [turn for page in reversed(pages) for turn in page] == ALL_TURNS
    assert [len(page) for page in pages] == [4, 4, 4, 2]


@pytest.mark.parametrize("limit", [1, 3])
async def test_tasks_sharing_a_sort_key_are_each_paged_once_in_both_directions(
    engine: AsyncEngine, limit: int
) -> None:
    """Records without a final event id sort at their completion millisecond: three tasks
    finishing in the same one share (ms, 0). The task id breaks the tie, so a page edge
    between them skips nothing (a cursor of (ms, seq, part) skipped the other tasks' rows)."""
    same = BASE_TIME
    await write(engine, [make_record(f"tie{i}", completed_at=same) for i in range(3)])
    history = HistoryStore(engine)
    expected = [(f"tie{i}", role) for i in range(3) for role in ("user", "assistant")]

    backward: list[list[tuple[str, str]]] = []
    page = await history.messages("acme", "s1", limit=limit)
    backward.append(turns(page.messages))
    while page.next_cursor is not None:
        page = await history.messages("acme", "s1", limit=limit, cursor=page.next_cursor)
        backward.append(turns(page.messages))
    assert [turn for found in reversed(backward) for turn in found] == expected

    forward: list[tuple[str, str]] = []
    page = await history.messages("acme", "s1", limit=limit, after_event_id="0-0")
    forward += turns(page.messages)
    while page.next_cursor is not None:
        page = await history.messages("acme", "s1", limit=limit, cursor=page.next_cursor)
        forward += turns(page.messages)
    assert forward == expected


async def test_after_event_id_returns_exactly_the_tasks_finished_after_it(
    history: HistoryStore,
) -> None:
    page = await history.messages("acme", "s1", limit=50, after_event_id="1000-9")
    assert turns(page.messages) == ALL_TURNS[6:]  # 1000-10 and later, compared as numbers
    missed = [m for m in page.messages if m.role == "assistant"]
    assert [m.final_event_id for m in missed] == ["1000-10", "1000-11", "10000-0", "10000-1"]


async def test_after_event_id_pages_forward_until_nothing_is_left(history: HistoryStore) -> None:
    seen: list[tuple[str, str]] = []
    page = await history.messages("acme", "s1", limit=3, after_event_id="999-5")
    seen += turns(page.messages)
    while page.next_cursor is not None:
        page = await history.messages("acme", "s1", limit=3, cursor=page.next_cursor)
        seen += turns(page.messages)
    assert seen == ALL_TURNS[2:]


async def test_after_a_join_mark_come_the_tasks_finished_after_its_millisecond(
    history: HistoryStore,
) -> None:
    """A socket joining a session without events is handed a join mark (`<ms>-<2^64-1>`) as
    its cursor; a page told `resumed: false` asks history for what came after it. It was a
    400 (the sequence is beyond PostgreSQL's bigint), so the missed answer could not be had."""
    page = await history.messages("acme", "s1", limit=50, after_event_id=f"1000-{2**64 - 1}")
    assert [m.final_event_id for m in page.messages if m.role == "assistant"] == [
        "10000-0",
        "10000-1",
    ]


async def test_after_the_newest_event_there_is_nothing(history: HistoryStore) -> None:
    page = await history.messages("acme", "s1", limit=50, after_event_id="10000-1")
    assert page.messages == []
    assert page.next_cursor is None


async def test_messages_carry_role_content_usage_and_timings(history: HistoryStore) -> None:
    page = await history.messages("acme", "s1", limit=2)
    question, answer = (message.to_dict() for message in page.messages)
    assert question["role"] == "user"
    assert question["content"] == "question task6"
    assert question["usage"] is None
    assert question["final_event_id"] == "10000-1"
    assert answer["message_id"] == "task6:assistant"
    assert answer["content"] == "answer task6"
    assert answer["usage"] == {"input_tokens": 10, "output_tokens": 5, "model": "sim", "cost": 0.1}
    assert answer["created_at"] == "2026-03-14T12:00:00Z"
    assert answer["first_chunk_at"] == "2026-03-14T12:00:00.200000Z"
    assert answer["completed_at"] == "2026-03-14T12:00:01Z"


async def test_a_finished_task_is_served_from_postgres_in_the_status_shape(
    history: HistoryStore,
) -> None:
    record = await history.task("acme", "task3")
    assert record is not None
    assert record.to_status() == {
        "task_id": "task3",
        "status": "completed",
        "created_at": "2026-03-14T12:00:00Z",
        "updated_at": "2026-03-14T12:00:01Z",
        "session_id": "s1",
        "agent_id": "default",
        "attempt": 1,
        "result": {"content": "answer task3", "role": "assistant"},
        "usage": {"input_tokens": 10, "output_tokens": 5, "model": "sim", "cost": 0.1},
    }
    assert await history.task("acme", "unknown") is None


async def test_usage_is_summed_per_utc_day_within_the_range(engine: AsyncEngine) -> None:
    day = timedelta(days=1)
    records = [
        make_record("a", completed_at=BASE_TIME, cost=0.1),
        make_record("b", completed_at=BASE_TIME, cost=0.2),
        make_record("c", completed_at=BASE_TIME + day, input_tokens=7, output_tokens=3),
        make_record("d", completed_at=BASE_TIME + day, status="failed"),
        make_record("e", completed_at=BASE_TIME + 3 * day),
    ]
    await write(engine, records)
    history = HistoryStore(engine)
    found = await history.usage("acme", date(2026, 3, 14), date(2026, 3, 16))
    assert [usage.to_dict() for usage in found] == [
        {
            "day": "2026-03-14",
            "requests": 2,
            "input_tokens": 20,
            "output_tokens": 10,
            "tokens": 30,
            "cost": pytest.approx(0.3),
        },
        {
            "day": "2026-03-15",
            "requests": 2,
            "input_tokens": 7,
            "output_tokens": 3,
            "tokens": 10,
            "cost": pytest.approx(0.1),
        },
    ]
    assert found[0].cost == 0.3  # summed as decimals, not floats


async def test_costs_are_billed_to_their_last_digit(engine: AsyncEngine) -> None:
    """Each task's cost was rounded to 10^-9 before the day's sum: four tasks of 2.5e-9 were
    billed 8e-9 while their clients were told 1e-8, and a cost of 4.2e-9 read back 4e-9."""
    await write(
        engine, [make_record(f"n{i}", completed_at=BASE_TIME, cost=2.5e-9) for i in range(4)]
    )
    await write(engine, [make_record("tiny", completed_at=BASE_TIME, cost=4.2e-9)])
    history = HistoryStore(engine)
    [day] = await history.usage("acme", date(2026, 3, 14), date(2026, 3, 14))
    assert day.cost == 1.42e-8
    task = await history.task("acme", "tiny")
    assert task is not None
    assert task.to_status()["usage"]["cost"] == 4.2e-9


async def test_erasing_a_session_deletes_its_history_and_late_records_stay_erased(
    engine: AsyncEngine,
) -> None:
    await write(engine, [make_record(f"t{i}", event_id=f"1-{i}") for i in range(3)])
    history = HistoryStore(engine)
    assert await history.session_exists("acme", "s1")
    assert await history.delete_session("acme", "s1") == 6
    assert not await history.session_exists("acme", "s1")
    assert (await history.messages("acme", "s1")).messages == []
    assert await history.task("acme", "t0") is None

    # A task created before the erasure, whose record was still on its way, writes nothing;
    # one created afterwards starts the session's history again.
    await write(engine, [make_record("late", event_id="2-0")])
    assert (await history.messages("acme", "s1")).messages == []
    after = BASE_TIME.replace(year=2100)
    await write(engine, [make_record("new", event_id="3-0", created_at=after)])
    page = await history.messages("acme", "s1")
    assert turns(page.messages) == [("new", "user"), ("new", "assistant")]
    usage = await history.usage("acme", date(2026, 1, 1), date(2026, 12, 31))
    assert usage[0].requests == 4  # erasing history does not refund usage


async def test_erasing_a_session_with_no_history_deletes_nothing(engine: AsyncEngine) -> None:
    assert await HistoryStore(engine).delete_session("acme", "nothing-here") == 0


async def test_a_page_of_long_answers_stops_at_its_character_budget_and_pages_on(
    engine: AsyncEngine,
) -> None:
    """200 answers of 32 000 CJK characters made one 19 MB page (0.13 s of the api's loop for a
    300-byte request): a page also ends at PAGE_CHARS, and its cursor goes on from there."""
    long = "答" * 300_000
    records = [
        msgspec.structs.replace(make_record(f"t{i}", event_id=f"1-{i}"), content=long)
        for i in range(10)
    ]
    async with engine.begin() as conn:
        await write_batch(conn, records)
    history = HistoryStore(engine)
    for start in ({}, {"after_event_id": "0-0"}):
        page = await history.messages("acme", "s1", limit=50, **start)  # type: ignore[arg-type]
        sizes = [len(page.messages)]
        seen = list(page.messages)
        while page.next_cursor:
            assert sum(len(m.content) for m in page.messages) <= PAGE_CHARS
            page = await history.messages("acme", "s1", limit=50, cursor=page.next_cursor)
            sizes.append(len(page.messages))
            seen = [*page.messages, *seen] if not start else [*seen, *page.messages]
        assert max(sizes) < 20, sizes  # not every message in one page
        assert [(m.task_id, m.role) for m in seen] == [
            (f"t{i}", role) for i in range(10) for role in ("user", "assistant")
        ], start

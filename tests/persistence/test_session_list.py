"""A user's sessions from the history (`HistoryStore.sessions_of`, `GET /api/sessions`), on a
real PostgreSQL: order and paging, who sees what, titles, refusals, and the query's plan."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import msgspec
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.errors import BadRequest, InvalidInput, RateLimited
from services.persistence.batch import write_batch
from services.persistence.cursor import ListCursor, encode_list_cursor
from services.persistence.history import HistoryStore, SessionPage, sessions_query
from services.persistence.pool_share import PoolShare
from services.persistence.records import PersistRecord
from tests.persistence.conftest import BASE_TIME, make_record

PAGE_MAX = 20


async def write(engine: AsyncEngine, records: list[PersistRecord]) -> None:
    async with engine.begin() as conn:
        await write_batch(conn, records)


def record(
    task_id: str,
    session_id: str,
    minute: int,
    *,
    user: str = "u1",
    tenant: str = "acme",
    message: str | None = None,
    status: str = "completed",
) -> PersistRecord:
    """A task of `user` in `session_id` that ended `minute` minutes after BASE_TIME."""
    ended = BASE_TIME + timedelta(minutes=minute)
    made = make_record(
        task_id,
        tenant_id=tenant,
        session_id=session_id,
        status=status,
        created_at=ended - timedelta(seconds=5),
        completed_at=ended,
    )
    return msgspec.structs.replace(made, user_id=user, message=message or f"ask {task_id}")


async def every_page(store: HistoryStore, tenant: str, user: str, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        page = await store.sessions_of(tenant, user, limit=limit, cursor=cursor)
        pages.append([session.session_id for session in page.sessions])
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor
        assert len(pages) < 20, pages


async def test_sessions_come_newest_first_and_pages_split_ties_without_gaps_or_repeats(
    engine: AsyncEngine,
) -> None:
    """Three sessions whose last messages share one microsecond: ordered by session id
    (descending), and a page edge between two of them loses and repeats none."""
    await write(
        engine,
        [
            record("t1", "s-e", 1),
            record("t2", "s-b", 2),
            record("t3", "s-b", 5),
            record("t4", "s-c", 5),
            record("t5", "s-d", 5),
            record("t6", "s-a", 9),
            record("t7", "s-d", 3),
        ],
    )
    store = HistoryStore(engine, page_max=PAGE_MAX)
    assert await every_page(store, "acme", "u1", 2) == [["s-a", "s-d"], ["s-c", "s-b"], ["s-e"]]
    assert await every_page(store, "acme", "u1", 3) == [["s-a", "s-d", "s-c"], ["s-b", "s-e"]]
    assert await every_page(store, "acme", "u1", 5) == [["s-a", "s-d", "s-c", "s-b", "s-e"]]
    whole = await store.sessions_of("acme", "u1")
    assert whole.next_cursor is None
    by_id = {session.session_id: session.to_dict() for session in whole.sessions}
    assert by_id["s-d"] == {
        "session_id": "s-d",
        "first_message_at": "2026-03-14T12:03:00Z",
        "last_message_at": "2026-03-14T12:05:00Z",
        "messages": 2,
        "title": "ask t7",  # the first to enter the history, not the first written
    }


async def test_only_the_users_own_messages_count_in_a_session_others_also_wrote_in(
    engine: AsyncEngine,
) -> None:
    """u2's later message, a failed task (no answer) and the answers do not change u1's
    entry; u2 sees the shared session with only its own words."""
    await write(
        engine,
        [
            record("a1", "shared", 1, message="u1 first"),
            record("a2", "shared", 2, status="failed"),
            record("b1", "shared", 7, user="u2", message="u2 words"),
        ],
    )
    store = HistoryStore(engine, page_max=PAGE_MAX)
    (mine,) = (await store.sessions_of("acme", "u1")).sessions
    assert (mine.title, mine.messages) == ("u1 first", 2)
    assert mine.last_message_at == BASE_TIME + timedelta(minutes=2)
    (theirs,) = (await store.sessions_of("acme", "u2")).sessions
    assert (theirs.title, theirs.messages) == ("u2 words", 1)


async def test_users_and_tenants_see_only_their_own_sessions(engine: AsyncEngine) -> None:
    """The same user id in another tenant and another user of the same tenant are others."""
    await write(
        engine,
        [
            record("x1", "a-only", 1, user="alice"),
            record("x2", "b-only", 2, user="bob"),
            record("x3", "other-tenant", 3, user="alice", tenant="globex"),
        ],
    )
    store = HistoryStore(engine, page_max=PAGE_MAX)

    async def listed(tenant: str, user: str) -> list[str]:
        page = await store.sessions_of(tenant, user)
        return [session.session_id for session in page.sessions]

    assert await listed("acme", "alice") == ["a-only"]
    assert await listed("acme", "bob") == ["b-only"]
    assert await listed("globex", "alice") == ["other-tenant"]
    assert await listed("globex", "bob") == []
    assert await listed("acme", "carol") == []


async def test_an_erased_session_is_not_listed(engine: AsyncEngine) -> None:
    await write(engine, [record("e1", "erased", 5), record("k1", "kept", 1)])
    store = HistoryStore(engine, page_max=PAGE_MAX)
    assert len((await store.sessions_of("acme", "u1")).sessions) == 2
    assert await store.delete_session("acme", "erased") == 2
    page = await store.sessions_of("acme", "u1")
    assert [session.session_id for session in page.sessions] == ["kept"]


@pytest.mark.parametrize(
    ("message", "title"),
    [
        ("a" * 99 + "\U0001f600" + "tail", "a" * 99 + "\U0001f600"),  # 101 UTF-16 units
        ("a" * 100 + "\U0001f600", "a" * 100),
        ("\U0001f468\u200d\U0001f469" * 40, ("\U0001f468\u200d\U0001f469" * 34)[:100]),
        ("short", "short"),
    ],
    ids=["emoji-last", "emoji-after", "zwj-sequences", "short"],
)
async def test_a_title_is_the_first_message_cut_at_100_characters_never_inside_one(
    engine: AsyncEngine, message: str, title: str
) -> None:
    await write(engine, [record("m1", "s", 1, message=message), record("m2", "s", 2)])
    page = await HistoryStore(engine, page_max=PAGE_MAX).sessions_of("acme", "u1")
    (session,) = page.sessions
    assert session.title == title
    assert len(session.title) <= 100
    session.title.encode("utf-16", "strict")  # no lone surrogate


async def test_a_bad_limit_or_cursor_is_refused_as_the_history_refuses_its_own(
    engine: AsyncEngine,
) -> None:
    await write(engine, [record(f"p{i}", f"s{i}", i) for i in range(3)])
    store = HistoryStore(engine, page_max=PAGE_MAX)
    for limit in (0, PAGE_MAX + 1):
        with pytest.raises(InvalidInput) as invalid:
            await store.sessions_of("acme", "u1", limit=limit)
        assert invalid.value.details == {"parameter": "limit", "max": PAGE_MAX}
    history_cursor = (await store.messages("acme", "s1", limit=1)).next_cursor
    list_cursor = (await store.sessions_of("acme", "u1", limit=1)).next_cursor
    assert history_cursor
    assert list_cursor
    bad_cursors = [
        "garbage",
        history_cursor,  # a page of a session's messages is no place in the list
        list_cursor[:-3],
        "l1." + "A" * 600,
        encode_list_cursor(ListCursor(0, "s1")).replace("l1.", "v2."),
        "l1.WzEsIm5vdCBhbiBpZCJd",  # [1,"not an id"]
        "l1.WzFlMzAsInMxIl0",  # [1e30,"s1"]: beyond what a datetime holds
    ]
    for cursor in bad_cursors:
        with pytest.raises(BadRequest) as bad:
            await store.sessions_of("acme", "u1", cursor=cursor)
        assert bad.value.details == {"parameter": "cursor"}, cursor
    with pytest.raises(BadRequest):
        await store.messages("acme", "s1", cursor=list_cursor)
    # The default page: 50, or the page max when smaller.
    assert len((await HistoryStore(engine, page_max=2).sessions_of("acme", "u1")).sessions) == 2


async def test_a_tenant_past_its_share_of_the_pool_is_refused_429(engine: AsyncEngine) -> None:
    await write(engine, [record("q1", "s", 1)])
    share = PoolShare(2, wait_seconds=0.1)  # one connection per tenant
    store = HistoryStore(engine, page_max=PAGE_MAX, share=share)
    async with share.hold("acme"):
        with pytest.raises(RateLimited) as refused:
            await store.sessions_of("acme", "u1")
        assert refused.value.details == {"scope": "tenant_reads", "limit": 1, "retry_in_ms": 1000}
        assert isinstance(await store.sessions_of("globex", "u1"), SessionPage)


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node] + [child for sub in node.get("Plans", []) for child in plan_nodes(sub)]


async def test_the_list_reads_the_users_index_range_not_the_tenants_messages(
    engine: AsyncEngine,
) -> None:
    """A tenant of 126 000 messages, 6 000 of them the user's (every 20th task, in 250
    sessions, with 6 000 answers): the plan reads only the user's range of
    `messages_user_sessions`, no other index and no table scan, on the first page and on
    a later one."""
    async with engine.begin() as conn:
        # Committed to disk before VACUUM runs, so it can mark the pages all-visible (the
        # test server commits asynchronously): the index-only scan then reads no table page.
        await conn.execute(text("SET LOCAL synchronous_commit = on"))
        await conn.execute(
            text(
                "INSERT INTO messages (tenant_id, task_id, role, session_id, part, agent_id,"
                " user_id, content, status, event_ms, event_seq, created_at, completed_at)"
                " SELECT 'big', 't' || n, 'user', 's' || (n % 5000), 0, 'default',"
                " CASE WHEN n % 20 = 0 THEN 'me' ELSE 'u' || (n % 37) END, repeat('x', 200),"
                " 'completed', n, 0, timestamptz '2026-03-14' + n * interval '1 second',"
                " timestamptz '2026-03-14' + n * interval '1 second'"
                " FROM generate_series(1, 120000) AS n"
            )
        )
        await conn.execute(
            text(
                "INSERT INTO messages SELECT tenant_id, task_id, 'assistant', session_id, 1,"
                " agent_id, user_id, content, status, final_event_id, event_ms, event_seq,"
                " input_tokens, output_tokens, cost, model, created_at, completed_at"
                " FROM messages WHERE tenant_id = 'big' AND user_id = 'me'"
            )
        )
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM ANALYZE messages"))
        later = ListCursor(int((BASE_TIME + timedelta(hours=20)).timestamp() * 1e6), "s7")
        for cursor in (None, later):
            query = sessions_query("big", "me", 51, cursor).compile(
                dialect=conn.dialect, compile_kwargs={"literal_binds": True}
            )
            explained = await conn.scalar(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}"))
            plan = json.loads(explained) if isinstance(explained, str) else explained
            nodes = plan_nodes(plan[0]["Plan"])
            kinds = [(node["Node Type"], node.get("Index Name")) for node in nodes]
            assert "Seq Scan" not in [kind for kind, _ in kinds], kinds
            assert {name for _, name in kinds} - {None} == {"messages_user_sessions"}, kinds
            scanned = [node["Actual Rows"] for node in nodes if "Scan" in node["Node Type"]]
            assert max(scanned) <= 6_000, kinds  # the user's messages, not the tenant's
            (grouped,) = [node for node in nodes if node["Node Type"] == "Index Only Scan"]
            assert grouped["Heap Fetches"] == 0, grouped
    page = await HistoryStore(engine, page_max=200).sessions_of("big", "me", limit=3)
    assert [s.session_id for s in page.sessions] == ["s0", "s4980", "s4960"]
    assert [s.messages for s in page.sessions] == [24, 24, 24]

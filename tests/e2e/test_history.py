"""The durable record on real processes: history, the shared cursor, PostgreSQL outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child, LocalStack
from services.persistence.migrate import migrate
from tests.e2e.clients import Event, auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, deploy, new_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(durable=False).start()
    asyncio.run(migrate(server.url()))
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def persisted(
    e2e_redis: RedisServer, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, Child]]:
    with deploy(
        e2e_redis,
        tmp_path_factory.mktemp("logs"),
        database_url=postgres.url(),
        session_log_maxlen="10",
        **FAST_EXECUTOR,
    ) as deployed:
        yield deployed.stack, deployed.api


async def history(
    api: Child, tenant: str, session: str, *, expect: int, **params: str
) -> list[dict[str, Any]]:
    """The session's messages once `expect` of them are persisted (the writer is async)."""
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(base_url=api.url) as http:
        while True:
            reply = await http.get(
                f"/api/sessions/{session}/messages", params=params, headers=auth(tenant)
            )
            messages: list[dict[str, Any]] = (
                reply.json()["messages"] if reply.status_code == 200 else []
            )
            if len(messages) >= expect or time.monotonic() > deadline:
                return messages
            await asyncio.sleep(0.05)


async def test_a_conversation_ends_up_in_history_in_order_with_usage(
    persisted: tuple[LocalStack, Child],
) -> None:
    _, api = persisted
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    finals: list[Event] = []
    async with httpx.AsyncClient() as http:
        for n in range(2):
            reply = await send(
                http,
                api.url,
                tenant,
                {"message": f"rest {n}", "stream": True, "session_id": session},
            )
            finals += (await events_until(ws, final_of(reply.json()["task_id"])))[-1:]
    await ws.send('{"type": "chat.send", "data": {"message": "by socket"}}')
    finals += (await events_until(ws, lambda e: e["type"] == "chat.response"))[-1:]
    await ws.close()

    messages = await history(api, tenant, session, expect=6)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert [m["content"] for m in messages[0::2]] == ["rest 0", "rest 1", "by socket"]
    assert [m["content"] for m in messages[1::2]] == [f["data"]["content"] for f in finals]
    assert [m["final_event_id"] for m in messages[1::2]] == [f["id"] for f in finals]
    assert [m["usage"] for m in messages[1::2]] == [f["data"]["usage"] for f in finals]

    async with httpx.AsyncClient(base_url=api.url) as http:
        usage = (await http.get("/api/usage", headers=auth(tenant))).json()["days"]
    reported = sum(f["data"]["usage"]["output_tokens"] for f in finals)
    assert sum(day["output_tokens"] for day in usage) == reported
    assert sum(day["requests"] for day in usage) == 3


async def test_resume_beyond_retention_then_history_after_the_cursor_fills_the_gap(
    persisted: tuple[LocalStack, Child],
) -> None:
    _, api = persisted
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        first = await send(http, api.url, tenant, {"message": "seen", "session_id": session})
        seen = await events_until(ws, final_of(first.json()["task_id"]))
        await ws.close()
        missed = []
        for n in range(3):  # long streams: far more events than the log's 10 entries
            reply = await send(
                http, api.url, tenant,
                {"message": f"missed {n}", "stream": True, "session_id": session,
                 "context": {"simulate": {"repeat": 40}}},
            )  # fmt: skip
            missed.append(reply.json()["task_id"])
    await history(api, tenant, session, expect=8)
    ws, ack = await connect(api.ws_url, tenant, session, last_event_id=seen[-1]["id"])
    assert ack["data"]["resumed"] is False
    await ws.close()
    gap = await history(api, tenant, session, expect=6, after_event_id=seen[-1]["id"])
    assert sorted(m["task_id"] for m in gap[1::2]) == sorted(missed), "exactly the missed ones"
    ends = [tuple(map(int, m["final_event_id"].split("-"))) for m in gap[1::2]]
    assert ends == sorted(ends), "in the order they finished on the socket"
    assert sorted(m["content"] for m in gap[0::2]) == ["missed 0", "missed 1", "missed 2"]
    assert seen[-1]["task_id"] not in {m["task_id"] for m in gap}


async def test_another_tenant_cannot_read_or_erase_history_or_usage(
    persisted: tuple[LocalStack, Child],
) -> None:
    _, api = persisted
    owner, intruder, session = unique("t"), unique("t"), unique("s")
    async with httpx.AsyncClient() as http:
        await send(http, api.url, owner, {"message": "private", "session_id": session})
    assert len(await history(api, owner, session, expect=2)) == 2
    async with httpx.AsyncClient(base_url=api.url) as http:
        read = await http.get(f"/api/sessions/{session}/messages", headers=auth(intruder))
        assert read.status_code == 404
        erase = await http.delete(f"/api/sessions/{session}", headers=auth(intruder))
        assert erase.status_code == 404
        usage = (await http.get("/api/usage", headers=auth(intruder))).json()
        assert usage["days"] == []
        assert len(await history(api, owner, session, expect=2)) == 2
        erased = await http.delete(f"/api/sessions/{session}", headers=auth(owner))
        assert erased.status_code == 200
        assert erased.json()["deleted_messages"] == 2
        gone = await http.get(f"/api/sessions/{session}/messages", headers=auth(owner))
        assert gone.status_code == 404


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/api/sessions/s1/messages", {"cursor": "not-a-cursor"}, 400),
        ("/api/sessions/s1/messages", {"after_event_id": "yesterday"}, 400),
        ("/api/sessions/s1/messages", {"limit": "100000"}, 422),
        ("/api/sessions/s1/messages", {"limit": "0"}, 422),
        ("/api/sessions/s%20!/messages", {}, 422),
        ("/api/usage", {"from": "2026-02-01", "to": "2026-01-01"}, 422),
        ("/api/usage", {"from": "last week"}, 422),
        ("/api/usage", {"from": "0001-01-01", "to": "0001-01-05"}, 200),
        ("/api/usage", {"to": "0001-01-05"}, 200),  # the default 30 days end at the calendar
    ],
)
async def test_bad_history_queries_get_the_documented_error_and_edge_dates_an_answer(
    persisted: tuple[LocalStack, Child], path: str, params: dict[str, str], status: int
) -> None:
    _, api = persisted
    async with httpx.AsyncClient(base_url=api.url) as http:
        reply = await http.get(path, params=params, headers=auth(unique("t")))
    assert reply.status_code == status, reply.text
    if status != 200:
        error = reply.json()["error"]
        assert error["code"] in ("bad_request", "validation_error")
        assert "body" not in error["message"], error  # a GET has none: say what was wrong


async def test_chats_go_on_while_postgres_is_down_and_history_catches_up_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A Redis of its own: the module's other stack would drain the same record stream into
    # its own database.
    redis = RedisServer().start()
    database = PostgresServer(durable=False).start()
    await migrate(database.url())
    stack = new_stack(
        redis, tmp_path_factory.mktemp("logs"), database_url=database.url(), **FAST_EXECUTOR
    )
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        tenant, session = unique("t"), unique("s")
        ws, _ = await connect(api.ws_url, tenant, session)
        database.stop()
        async with httpx.AsyncClient() as http:
            for n in range(5):
                reply = await send(
                    http, api.url, tenant,
                    {"message": f"while down {n}", "stream": True, "session_id": session},
                )  # fmt: skip
                events = await events_until(ws, final_of(reply.json()["task_id"]))
                assert events[-1]["type"] == "chat.response"
            detailed = (await http.get(f"{api.url}/health/detailed")).json()["components"]
            assert detailed["database"]["status"] == "down"
            for path in (f"/api/sessions/{session}/messages", "/api/usage"):
                down = await http.get(f"{api.url}{path}", headers=auth(tenant))
                assert down.status_code == 503, (path, down.text)
                assert down.json()["error"]["code"] == "unavailable"
                assert "PostgreSQL" in down.json()["error"]["message"]  # not "redis"
            unknown = await http.get(f"{api.url}/api/chat/tasks/unknownTask1", headers=auth(tenant))
            assert unknown.status_code == 503, unknown.text
            # Another tenant's task answers as an unknown id: from PostgreSQL too (unavailable
            # here). Answered from Redis alone (404), it told that the id exists.
            theirs, stranger = reply.json()["task_id"], unique("t")
            status = await http.get(f"{api.url}/api/chat/tasks/{theirs}", headers=auth(stranger))
            cancel = await http.post(
                f"{api.url}/api/chat/cancel", json={"task_id": theirs}, headers=auth(stranger)
            )
            assert (status.status_code, cancel.status_code) == (503, 503), (status, cancel)
            assert "redis unavailable" not in api.output(100_000)
            assert detailed["persistence_backlog"] >= 1
        await ws.close()
        database.start()
        messages = await history(api, tenant, session, expect=10)
        assert [m["content"] for m in messages[0::2]] == [f"while down {n}" for n in range(5)]
        assert len({(m["task_id"], m["role"]) for m in messages}) == len(messages) == 10
    finally:
        stack.stop()
        database.cleanup()
        redis.cleanup()

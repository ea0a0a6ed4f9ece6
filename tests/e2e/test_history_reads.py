"""A chat sidebar, a history view and a bill built from README's read APIs, on real processes:
real Valkey, PostgreSQL, api, worker and executor."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, deploy
from tests.e2e.test_history import postgres

__all__ = ["postgres"]  # the fixture, used here

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(
    e2e_redis: RedisServer, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    with deploy(
        e2e_redis, tmp_path_factory.mktemp("logs"), database_url=postgres.url(), **FAST_EXECUTOR
    ) as deployed:
        yield deployed.api


async def run_tasks(
    api: Child, tenant: str, session: str, bodies: list[dict[str, Any]]
) -> list[dict]:
    """Send each body, wait for its final socket event; return the finals."""
    ws, _ = await connect(api.ws_url, tenant, session)
    finals = []
    async with httpx.AsyncClient() as http:
        for body in bodies:
            reply = await send(http, api.url, tenant, {"session_id": session, **body})
            assert reply.status_code == 202, reply.text
            finals.append((await events_until(ws, final_of(reply.json()["task_id"])))[-1])
    await ws.close()
    return finals


async def page(api: Child, tenant: str, session: str, **params: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api.url) as http:
        return await http.get(
            f"/api/sessions/{session}/messages", params=params, headers=auth(tenant), timeout=10
        )


async def test_a_failed_tasks_history_row_says_why_it_failed(api: Child) -> None:
    """A history view (after a reload, or a client told `resumed: false`) renders a failed
    task. The live socket showed `chat.error` {code execution_failed, message "simulated
    failure of attempt 1"}; the user expects the history to say why too (README: PostgreSQL
    holds the "tasks' final state"). The page held only the question with `status: failed`:
    no error code or message, no assistant row; the reason was only in
    GET /api/chat/tasks/{id}, one extra request per failed task. The question now carries
    its task's `error`."""
    tenant, session = unique("t"), unique("s")
    finals = await run_tasks(
        api, tenant, session,
        [{"message": "boom", "context": {"simulate": {"fail_attempts": 9, "retryable": False}}}],
    )  # fmt: skip
    assert finals[0]["type"] == "chat.error"
    body = (await page(api, tenant, session)).json()
    rows = body["messages"]
    assert [(m["role"], m["status"]) for m in rows] == [("user", "failed")]
    shown = finals[0]["data"]
    assert rows[0]["error"]["code"] == shown["code"], body
    assert rows[0]["error"]["message"] == shown["message"], body


async def test_a_retried_task_keeps_one_answer_and_counts_one_request(api: Child) -> None:
    """A task that failed once (retryable) and then completed: one user + one assistant row,
    the usage of the final attempt, one request in /api/usage."""
    tenant, session = unique("t"), unique("s")
    finals = await run_tasks(
        api, tenant, session, [{"message": "again", "context": {"simulate": {"fail_attempts": 1}}}]
    )
    assert finals[0]["type"] == "chat.response", finals
    rows = (await page(api, tenant, session)).json()["messages"]
    assert [m["role"] for m in rows] == ["user", "assistant"]
    assert [m["error"] for m in rows] == [None, None]  # the failed first attempt is not why
    assert rows[1]["usage"] == finals[0]["data"]["usage"]
    async with httpx.AsyncClient(base_url=api.url) as http:
        days = (await http.get("/api/usage", headers=auth(tenant))).json()["days"]
    assert sum(d["requests"] for d in days) == 1
    assert sum(d["output_tokens"] for d in days) == finals[0]["data"]["usage"]["output_tokens"]


async def test_a_cancelled_task_is_a_request_without_tokens(api: Child) -> None:
    """Usage for a bill: a cancelled task is one request; the messages page shows its question
    with status cancelled."""
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient(base_url=api.url) as http:
        reply = await send(
            http,
            api.url,
            tenant,
            {"session_id": session, "message": "slow", "context": {"simulate": {"stall": True}}},
        )
        task_id = reply.json()["task_id"]
        cancel = await http.post(
            "/api/chat/cancel", json={"task_id": task_id}, headers=auth(tenant)
        )
        assert cancel.status_code == 200, cancel.text
        await events_until(ws, final_of(task_id))
        await ws.close()
        rows = (await page(api, tenant, session)).json()["messages"]
        days = (await http.get("/api/usage", headers=auth(tenant))).json()["days"]
    assert [(m["role"], m["status"]) for m in rows] == [("user", "cancelled")]
    assert sum(d["requests"] for d in days) == 1
    assert sum(d["output_tokens"] for d in days) == 0


async def test_cursors_of_another_list_or_session_are_refused(api: Child) -> None:
    """A cursor is only good for the list it came from: one of session A used on B, the
    session list's cursor on messages and the other way round are 400 bad_request."""
    tenant, a, b = unique("t"), unique("s"), unique("s")
    await run_tasks(api, tenant, a, [{"message": "a1"}, {"message": "a2"}])
    await run_tasks(api, tenant, b, [{"message": "b1"}, {"message": "b2"}])
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        h = auth(tenant)
        ca = (await http.get(f"/api/sessions/{a}/messages?limit=1", headers=h)).json()[
            "next_cursor"
        ]
        cl = (await http.get("/api/sessions?limit=1", headers=h)).json()
        out = {
            "a_on_b": await http.get(
                f"/api/sessions/{b}/messages", params={"cursor": ca}, headers=h
            ),
            "list_on_msgs": await http.get(
                f"/api/sessions/{a}/messages", params={"cursor": cl["next_cursor"]}, headers=h
            ),
            "msgs_on_list": await http.get("/api/sessions", params={"cursor": ca}, headers=h),
            "tampered": await http.get(
                f"/api/sessions/{a}/messages",
                params={"cursor": ca[:-2] + ("A" if ca[-2] != "A" else "B") + ca[-1]},
                headers=h,
            ),
        }
        page2 = (
            await http.get(
                "/api/sessions", params={"limit": 1, "cursor": cl["next_cursor"]}, headers=h
            )
        ).json()
    assert [s["session_id"] for s in cl["sessions"] + page2["sessions"]] == [b, a]
    assert page2["next_cursor"] is None
    for k in ("a_on_b", "list_on_msgs", "msgs_on_list"):
        assert out[k].status_code == 400, k


async def test_a_session_used_again_after_its_erasure_lists_only_the_new_words(api: Child) -> None:
    """A "clear conversation" button: DELETE, then the user writes again in the same session.
    The sidebar lists it again with the new message as title and count 1; the page holds only
    the new task."""
    tenant, session = unique("t"), unique("s")
    await run_tasks(api, tenant, session, [{"message": "old words"}])
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        h = auth(tenant)
        assert (await http.delete(f"/api/sessions/{session}", headers=h)).status_code == 200
    await run_tasks(api, tenant, session, [{"message": "new words"}])
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        h = auth(tenant)
        rows = (await http.get(f"/api/sessions/{session}/messages", headers=h)).json()["messages"]
        listed = (await http.get("/api/sessions", headers=h)).json()["sessions"]
    assert [m["content"] for m in rows][:1] == ["new words"]
    assert len(rows) == 2
    assert [(s["session_id"], s["title"], s["messages"]) for s in listed] == [
        (session, "new words", 1)
    ]


async def test_a_conversation_held_only_over_the_socket_is_in_the_users_sidebar(api: Child) -> None:
    """A chat page that sends by socket (`chat.send`) finds the session in GET /api/sessions
    of the same user, and not in another user's list."""
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    await ws.send('{"type": "chat.send", "data": {"message": "by socket only"}}')
    await events_until(ws, lambda e: e["type"] == "chat.response")
    await ws.close()
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        await http.get(f"/api/sessions/{session}/messages", headers=auth(tenant))  # waits
        mine = (await http.get("/api/sessions", headers=auth(tenant))).json()["sessions"]
        other = (await http.get("/api/sessions", headers=auth(tenant, user="user-2"))).json()
    assert [(s["session_id"], s["title"]) for s in mine] == [(session, "by socket only")]
    assert other["sessions"] == []


async def _holding(redis: Any, session: str, words: bytes) -> dict[str, str]:
    """Redis keys naming `session`, or holding `words` (strings, hashes, streams)."""
    left: dict[str, str] = {}
    async for key in redis.scan_iter(match="*", count=1000):
        name = key.decode() if isinstance(key, bytes) else key
        kind = await redis.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if session in name:
            left[name] = kind
        elif kind == "string":  # (a task's `where` and usage `counted` markers hold no words)
            value = await redis.get(key)
            if value and words in value:
                left[name] = kind
        elif kind == "stream":
            for entry_id, fields in await redis.xrange(key, "-", "+"):
                if words in b"".join(k + v for k, v in fields.items()):
                    left[f"{name} {entry_id!r}"] = kind
        elif kind == "hash" and words in b"".join(
            k + v for k, v in (await redis.hgetall(key)).items()
        ):
            left[name] = kind
    return left


async def test_an_open_tab_is_told_its_finished_conversation_was_erased(api: Child) -> None:
    """Another tab erases the conversation (`DELETE /api/sessions/{id}`) while this one shows
    it, its tasks all ended. Only a running task's `chat.cancelled` said anything: this tab
    was told nothing and kept showing what was erased. It gets `session.erased` now, last,
    and its socket stays open."""
    tenant, session = unique("t"), unique("s")
    await run_tasks(api, tenant, session, [{"message": "to forget"}])
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient(base_url=api.url) as http:
        erased = await http.delete(f"/api/sessions/{session}", headers=auth(tenant))
        assert erased.status_code == 200, erased.text
        told = await events_until(ws, lambda e: e["type"] == "session.erased", timeout=10)
        assert told[-1]["data"] == {"session_id": session}
        again = await http.delete(f"/api/sessions/{session}", headers=auth(tenant))
        assert again.status_code == 404  # nothing left: an unknown session still
    await ws.send('{"type": "ping"}')
    assert (await events_until(ws, lambda e: e["type"] == "pong"))[-1]["type"] == "pong"
    await ws.close()

"""The message path with the previous release's api or worker next to this one's, as during a
rolling update: sends, streamed and plain answers in order on a socket of either api, the
task's state, a cancel, history and a resume after a reconnect to the other api."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from services.cli.stack import Child
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.upgrade.conftest import Mixed

pytestmark = pytest.mark.e2e

VERSIONS = ("old", "new")


def api(mixed: Mixed, version: str) -> Child:
    return mixed.old_api if version == "old" else mixed.new_api


async def history(
    http: httpx.AsyncClient, at: Child, tenant: str, session: str, expect: int
) -> Any:
    """The session's messages once `expect` are persisted (the writer is asynchronous)."""
    deadline = time.monotonic() + 20
    while True:
        reply = await http.get(f"{at.url}/api/sessions/{session}/messages", headers=auth(tenant))
        messages = reply.json().get("messages", []) if reply.status_code == 200 else []
        if len(messages) >= expect or time.monotonic() > deadline:
            return reply.status_code, messages
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("worker", VERSIONS)
@pytest.mark.parametrize("sender", VERSIONS)
async def test_answers_reach_a_socket_on_either_api_in_order(
    mixed: Mixed, sender: str, worker: str
) -> None:
    """A streamed and a plain answer, sent through one api, reach a socket on the other in
    order; their state and history read the same on both apis; a stalled task is cancelled
    through the other api; a socket that missed events resumes on the other api."""
    mixed.use(worker=worker, executor=worker)
    here, there = api(mixed, sender), api(mixed, "new" if sender == "old" else "old")
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(there.ws_url, tenant, session)
    async with httpx.AsyncClient(timeout=10) as http:
        streamed = await send(
            http, here.url, tenant, {"message": "one two three", "session_id": session,
                                     "stream": True},
        )  # fmt: skip
        assert streamed.status_code == 202, streamed.text
        first = streamed.json()["task_id"]
        events = await events_until(ws, final_of(first))
        chunks = [e["data"]["seq"] for e in events if e["type"] == "chat.chunk"]
        assert chunks, events
        assert chunks == list(range(1, len(chunks) + 1)), events
        assert events[-1]["type"] == "chat.response", events
        plain = await send(http, here.url, tenant, {"message": "plain", "session_id": session})
        second = plain.json()["task_id"]
        events = await events_until(ws, final_of(second))
        assert events[-1]["type"] == "chat.response", events
        assert "plain" in events[-1]["data"]["content"]
        for at in (here, there):
            state = await http.get(f"{at.url}/api/chat/tasks/{first}", headers=auth(tenant))
            assert state.status_code == 200, state.text
            assert state.json()["status"] == "completed", state.text
        # A cancel through the other api of a task that stalls in the executor.
        stalled = await send(
            http, here.url, tenant,
            {"message": "stall", "session_id": session, "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
        third = stalled.json()["task_id"]
        cancelled = await http.post(
            f"{there.url}/api/chat/cancel", json={"task_id": third}, headers=auth(tenant)
        )
        assert cancelled.status_code == 200, cancelled.text
        events = await events_until(ws, final_of(third))
        assert events[-1]["type"] == "chat.cancelled", events
        last_seen = events[-1]["id"]
        await ws.close()
        # Missed while away, resumed on the other api.
        missed = await send(http, there.url, tenant, {"message": "away", "session_id": session})
        fourth = missed.json()["task_id"]
        while (await http.get(f"{here.url}/api/chat/tasks/{fourth}", headers=auth(tenant))).json()[
            "status"
        ] != "completed":
            await asyncio.sleep(0.05)
        ws, ack = await connect(here.ws_url, tenant, session, last_event_id=last_seen)
        assert ack["data"].get("resumed") is not False, ack
        events = await events_until(ws, final_of(fourth))
        await ws.close()
        assert [e for e in events if e["task_id"] != fourth] == [], events
        for at in (here, there):
            status, messages = await history(http, at, tenant, session, expect=7)
            assert status == 200, messages
            assert [m["role"] for m in messages].count("user") == 4, messages

"""Where a new socket (no `last_event_id`) starts in its session's events.

A page opens its socket and sends its message as soon as the socket is open (`onopen`, the
handshake's reply), not after the `connection.ack`. It expects the answer on that socket.
The api completed the handshake, then subscribed the socket and read where the session's
log ended: a send and its answer that reached the log in between (a busy pod: its hub
subscribes sockets one at a time) were before the socket's start, and never sent to it. The
page saw `connection.ack` and waited for ever (the browser test's intermittent CI failure:
"no chat.response in 30 s; saw connection.ack", the task completed). Found by the browser
flake hunt.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from services.core.events import parse_event_id
from tests.e2e.clients import Event, events_until, final_of, next_event, send, token, unique
from tests.e2e.conftest import Deployment

pytestmark = pytest.mark.e2e

# Sockets opened with the page's, each of its own tenant: their set-ups queue ahead of the
# page's on the api's hub, as on any busy pod.
OTHERS = 300


async def _open(ws_base: str, tenant: str, session: str) -> ClientConnection:
    """The handshake only (what `onopen` waits for), not the ack."""
    return await websockets.connect(
        f"{ws_base}/ws/{tenant}/{session}",
        subprotocols=["orchestrator.v1", f"bearer.{token(tenant)}"],  # type: ignore[list-item]
        open_timeout=60,
    )


async def test_a_message_sent_as_soon_as_the_socket_opens_is_answered_on_it(
    deployment: Deployment,
) -> None:
    api = deployment.api
    others: list[ClientConnection] = []
    joining = asyncio.Event()

    async def other() -> None:
        others.append(await _open(api.ws_url, unique("t"), unique("s")))
        joining.set()

    tenant, session = unique("t"), unique("s")
    async with httpx.AsyncClient(timeout=20) as http:
        await http.get(f"{api.url}/health")  # a kept-alive connection: the send goes at once
        crowd = [asyncio.create_task(other()) for _ in range(OTHERS)]
        try:
            await joining.wait()  # the api is setting them up, one after the other
            ws = await _open(api.ws_url, tenant, session)
            reply = await send(http, api.url, tenant, {"message": "hi", "session_id": session})
        finally:
            await asyncio.gather(*crowd, return_exceptions=True)
    try:
        assert reply.status_code == 202, reply.text
        task_id = reply.json()["task_id"]
        ack = await next_event(ws)
        assert ack["type"] == "connection.ack", ack
        assert ack["data"]["resumed"] is None, ack
        seen = await events_until(ws, final_of(task_id), timeout=20)
        types = [event["type"] for event in seen]
        assert types[0] == "chat.status", types
        assert types[-1] == "chat.response", types
        # A client keeping `lastId = frame.id` from the ack resumes before what followed it.
        assert parse_event_id(ack["id"]) < parse_event_id(seen[0]["id"]), (ack, seen[0])
        await ws.close()
    finally:
        for sock in others:
            with contextlib.suppress(Exception):
                await sock.close()


async def test_a_new_socket_gets_nothing_from_before_it_opened(
    deployment: Deployment,
) -> None:
    """The other half of the join point: a second tab opened after an answer does not get
    that answer again (it starts where the log stood at its handshake)."""
    api = deployment.api
    tenant, session = unique("t"), unique("s")
    async with httpx.AsyncClient(timeout=20) as http:
        first, _ = await _with_ack(api.ws_url, tenant, session)
        reply = await send(http, api.url, tenant, {"message": "one", "session_id": session})
        await events_until(first, final_of(reply.json()["task_id"]))
        second, ack = await _with_ack(api.ws_url, tenant, session)
        reply = await send(http, api.url, tenant, {"message": "two", "session_id": session})
        task_id = reply.json()["task_id"]
        seen = await events_until(second, final_of(task_id))
    assert {event.get("task_id") for event in seen} == {task_id}, seen
    assert all(parse_event_id(event["id"]) > parse_event_id(ack["id"]) for event in seen)
    await first.close()
    await second.close()


async def _with_ack(ws_base: str, tenant: str, session: str) -> tuple[ClientConnection, Event]:
    ws = await _open(ws_base, tenant, session)
    ack = await next_event(ws)
    assert ack["type"] == "connection.ack", ack
    return ws, ack

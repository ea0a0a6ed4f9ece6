"""Sockets through a real nginx configured as the chart's ingress-nginx annotations ask:
the handshake, compression, streaming, pings, close codes, and resume after a drain."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.e2e.clients import Event, auth, final_of, next_event, token, unique
from tests.ingress.conftest import ORIGIN, Front
from tests.ingress.nginx import COOKIE, Nginx

pytestmark = pytest.mark.e2e


async def open_socket(
    base: str,
    tenant: str,
    session: str,
    *,
    pin: str | None = None,
    last_event_id: str | None = None,
    bearer: str | None = None,
    **kwargs: Any,
) -> ClientConnection:
    """A browser's socket: token in the subprotocol, the affinity cookie when it has one."""
    url = f"{base}/ws/{tenant}/{session}"
    if last_event_id is not None:
        url += f"?last_event_id={last_event_id}"
    headers = {"Cookie": f"{COOKIE}={pin}"} if pin else None
    return await websockets.connect(
        url,
        subprotocols=["orchestrator.v1", f"bearer.{bearer or token(tenant)}"],  # type: ignore[list-item]
        additional_headers=headers,
        open_timeout=10,
        **kwargs,
    )


def pinned_to(ws: ClientConnection) -> str | None:
    """The upstream the proxy says answered the handshake (its Set-Cookie)."""
    assert ws.response is not None
    cookie = ws.response.headers.get("Set-Cookie", "")
    return cookie.split(";")[0].partition("=")[2] or None


async def timed_stream(ws: ClientConnection, http: httpx.AsyncClient, base: str) -> list[float]:
    """Send a streamed message paced at 100 ms per chunk; the arrival times of its chunks and
    of its answer, relative to the send."""
    tenant_session = ws.request.path.split("?")[0].split("/") if ws.request else []
    tenant, session = tenant_session[2], tenant_session[3]
    started = time.monotonic()
    reply = await http.post(
        f"{base}/api/chat/send",
        json={
            "message": "one two three four five",
            "session_id": session,
            "stream": True,
            "context": {"simulate": {"chunk_delay_ms": 100}},
        },
        headers=auth(tenant),
    )
    assert reply.status_code == 202, reply.text
    task_id = reply.json()["task_id"]
    arrivals: list[float] = []
    seqs: list[int] = []
    while True:
        event = await next_event(ws)
        if event.get("task_id") != task_id:
            continue
        if event["type"] == "chat.chunk":
            seqs.append(event["data"]["seq"])
            arrivals.append(time.monotonic() - started)
        if final_of(task_id)(event):
            assert event["type"] == "chat.response", event
            arrivals.append(time.monotonic() - started)
            break
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    return arrivals


async def test_handshake_compression_and_unbuffered_chunks_through_nginx(front: Front) -> None:
    """Guard: through the proxy the server selects `orchestrator.v1` (the token is never
    echoed), permessage-deflate is negotiated end to end, and streamed chunks arrive in
    order as they are made (paced 100 ms apart, not held back to arrive with the answer), in
    about the time they take direct."""
    tenant = unique("t")
    async with httpx.AsyncClient(timeout=10) as http:
        timings = {}
        for name, base, http_base in (
            ("nginx", front.nginx.ws_url, front.nginx.url),
            ("direct", front.a.ws_url, front.a.url),
        ):
            ws = await open_socket(base, tenant, unique("s"), origin=ORIGIN)
            try:
                assert ws.subprotocol == "orchestrator.v1"
                assert ws.response is not None
                extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
                assert "permessage-deflate" in extensions, extensions
                ack = await next_event(ws)
                assert ack["type"] == "connection.ack"
                timings[name] = await timed_stream(ws, http, http_base)
            finally:
                await ws.close()
    chunks = timings["nginx"][:-1]
    assert chunks[-1] - chunks[0] >= 0.1 * (len(chunks) - 2), timings  # paced, not batched
    assert timings["nginx"][0] < timings["direct"][0] + 0.5, timings


async def test_close_codes_reach_the_client_through_nginx(front: Front) -> None:
    """Guard: a bad token's 1008 and an unknown origin's HTTP 403 reach the client as the api
    sent them (the page code decides between signIn and a retry on exactly these)."""
    tenant = unique("t")
    ws = await open_socket(front.nginx.ws_url, tenant, unique("s"), bearer="not-a-jwt")
    with pytest.raises(ConnectionClosed) as closed:
        await next_event(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    with pytest.raises(InvalidStatus) as refused:
        await open_socket(front.nginx.ws_url, tenant, unique("s"), origin="https://evil.example")
    assert refused.value.response.status_code == 403


async def test_an_idle_socket_outlives_the_proxy_read_timeout(front: Front, tmp_path: Any) -> None:
    """Guard: the api's protocol pings keep a socket the client never speaks on alive past
    nginx's proxy_read_timeout (the chart's 3600 s against 30 s pings, scaled here to 2 s
    against 1 s)."""
    assert front.a.port is not None
    assert front.b.port is not None
    short = Nginx(tmp_path / "nginx", front.a.port, front.b.port, read_timeout=2).start()
    try:
        ws = await open_socket(short.ws_url, unique("t"), unique("s"))
        try:
            await next_event(ws)  # the ack
            await asyncio.sleep(4.5)  # idle, on purpose: twice the proxy's read timeout
            await ws.send('{"type": "ping"}')
            assert (await next_event(ws, timeout=5))["type"] == "pong"
        finally:
            await ws.close()
    finally:
        short.stop()


async def read_until_closed(ws: ClientConnection, events: list[Event]) -> None:
    """Append every event to `events` until the socket is closed (raises ConnectionClosed)."""
    while True:
        events.append(json.loads(await ws.recv()))


def drain(api_metrics_port: int) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{api_metrics_port}/drain", headers={"X-Orchestrator-Drain": "preStop"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310
        return int(reply.status)


async def test_resume_on_the_other_api_after_the_pinned_one_drained_and_stopped(
    own_front: Front,
) -> None:
    """A page pinned by the affinity cookie to api A streams an answer; A is drained as the
    preStop hook does (1012) and stopped. The page reconnects with its cookie (pointing at a
    dead upstream) and `last_event_id`: it lands on B, resumed, and the answer ends with no
    chunk lost or repeated."""
    front = own_front
    tenant, session = unique("t"), unique("s")
    ws = await open_socket(front.nginx.ws_url, tenant, session, pin="a")
    assert pinned_to(ws) == "a"
    events: list[Event] = [await next_event(ws)]
    async with httpx.AsyncClient(base_url=front.nginx.url, timeout=10) as http:
        reply = await http.post(
            "/api/chat/send",
            json={
                "message": " ".join(["word"] * 30),
                "session_id": session,
                "stream": True,
                "context": {"simulate": {"chunk_delay_ms": 50}},
            },
            headers={**auth(tenant), "Cookie": f"{COOKIE}=a"},
        )
    task_id = reply.json()["task_id"]
    while not any(e["type"] == "chat.chunk" for e in events):
        events.append(await next_event(ws))
    assert front.a.metrics_port is not None
    assert await asyncio.to_thread(drain, front.a.metrics_port) == 200
    with pytest.raises(ConnectionClosed) as closed:
        await read_until_closed(ws, events)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1012, closed.value
    front.stack.stop_child(front.a)

    ws = await open_socket(
        front.nginx.ws_url, tenant, session, pin="a", last_event_id=events[-1]["id"]
    )
    try:
        assert pinned_to(ws) == "b"
        ack = await next_event(ws)
        assert ack["data"]["resumed"] is True, ack
        while not final_of(task_id)(events[-1]):
            events.append(await next_event(ws))
    finally:
        await ws.close()
    seqs = [e["data"]["seq"] for e in events if e["type"] == "chat.chunk"]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert events[-1]["type"] == "chat.response"

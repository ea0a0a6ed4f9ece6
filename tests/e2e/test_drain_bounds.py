"""The drain's bounds: it ends within its window plus `OVERRUN_SECONDS` whatever the clients do
(the kubelet SIGKILLs the pod at terminationGracePeriodSeconds = drain.seconds + marginSeconds,
counted from preStop), and no socket stays open on a drained pod, not even one whose handshake
was under way when the drain started."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from services.api.connections import ClientConnection, Message
from services.api.drain import OVERRUN_SECONDS, drain
from services.api.runtime import Runtime
from services.cli.embedded import RedisServer
from services.cli.stack import Child
from tests.e2e.clients import connect, next_event, send, token, unique
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e

FINAL = {"chat.response", "chat.error", "chat.cancelled"}
MARGIN = 15.0  # the chart's api.drain.marginSeconds


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def drain_call(api: Child) -> tuple[int, str, float]:
    """`GET /drain` as the chart's preStop sends it: (status, body, seconds it took)."""
    started = time.monotonic()
    status, body = await asyncio.to_thread(
        get, f"http://127.0.0.1:{api.metrics_port}/drain", {"X-Orchestrator-Drain": "preStop"}
    )
    return status, body, time.monotonic() - started


@dataclass
class Watcher:
    """A page's socket that reads everything, keeping `lastId = frame.id`."""

    base: str
    tenant: str
    session: str
    events: list[dict[str, Any]] = field(default_factory=list)
    closes: list[int | None] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        url = f"{self.base}/ws/{self.tenant}/{self.session}"
        protocols = ["orchestrator.v1", f"bearer.{token(self.tenant)}"]
        try:
            async with websockets.connect(url, subprotocols=protocols) as ws:  # type: ignore[arg-type]
                async for raw in ws:
                    event = json.loads(raw)
                    if event["type"] == "connection.ack":
                        self.ready.set()
                    else:
                        self.events.append(event)
        except ConnectionClosed as exc:
            self.closes.append(exc.rcvd.code if exc.rcvd else None)
            return
        self.closes.append(ws.close_code)

    def answered(self, task_id: str) -> bool:
        return any(e["type"] in FINAL and e.get("task_id") == task_id for e in self.events)


def non_reading_socket(port: int, tenant: str, session: str) -> socket.socket:
    """A real client that completes the handshake and then stops reading (a stalled phone)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET /ws/{tenant}/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: orchestrator.v1, bearer.{token(tenant)}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_drain_with_slow_readers_answers_within_its_window(
    e2e_redis: RedisServer, tmp_path: Path
) -> None:
    """8 clients that stopped reading (full outboxes) and 8 that read: /drain answered after
    26 s with a 2 s window (sockets flushed one after another, each close waiting up to 10 s),
    past the 17 s grace period. Now within window + OVERRUN_SECONDS; readers get 1012."""
    window, slow = 2.0, 8
    stack = new_stack(
        e2e_redis, tmp_path / "logs", drain_seconds=str(window), executor_chunk_delay_ms="0"
    )
    runners: list[asyncio.Task[None]] = []
    stalled: list[socket.socket] = []
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        await asyncio.to_thread(stack.wait_ready, api)
        assert api.port is not None
        tenant = unique("t")
        sessions = [unique("s") for _ in range(slow)]
        watchers = [Watcher(api.ws_url, tenant, s) for s in sessions]
        runners = [asyncio.create_task(w.run()) for w in watchers]
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in watchers)), 30)
        for s in sessions:
            stalled.append(await asyncio.to_thread(non_reading_socket, api.port, tenant, s))
        tasks = []
        async with httpx.AsyncClient(timeout=20) as http:
            for s in sessions * 10:
                reply = await send(http, api.url, tenant, {
                    "message": "x" * 30_000, "stream": True, "session_id": s,
                    "context": {"simulate": {"repeat": 10}}})  # fmt: skip
                assert reply.status_code in (200, 202), reply.text
                tasks.append(reply.json()["task_id"])

        async def all_answered() -> None:
            pairs = list(zip(watchers * 10, tasks, strict=True))
            while not all(w.answered(t) for w, t in pairs):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(all_answered(), 30)  # the stalled sockets' outboxes are full now
        status, body, took = await asyncio.wait_for(drain_call(api), 55)
        assert status == 200, body
        assert took < window + OVERRUN_SECONDS + 1, (
            f"/drain (preStop) took {took:.1f}s with {slow} non-reading clients "
            f"(window {window}s, grace period {window + MARGIN:.0f}s)"
        )
        await asyncio.wait_for(asyncio.gather(*runners), 10)
        assert [w.closes for w in watchers] == [[1012]] * slow
    finally:
        for r in runners:
            r.cancel()
        for sock in stalled:
            sock.close()
        await asyncio.to_thread(stack.stop)


async def test_socket_whose_admission_waited_on_redis_during_the_drain_is_refused(
    tmp_path: Path,
) -> None:
    """A handshake past the `draining` check, waiting on Redis for its tenant's quota when the
    drain started, was admitted afterwards: connection.ack, then open on the drained pod."""
    window = 1.0
    redis = RedisServer().start()
    stack = new_stack(redis, tmp_path / "logs", drain_seconds=str(window))
    frozen = False
    try:
        api = stack.start_api()
        await asyncio.to_thread(stack.wait_ready, api)
        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)  # Redis slow for a moment
        frozen = True
        opening = asyncio.create_task(connect(api.ws_url, unique("t"), unique("s")))
        await asyncio.sleep(0.5)  # the handshake now waits for Redis in its admission
        status, body, _ = await drain_call(api)
        assert status == 200, body
        os.kill(redis.process.pid, signal.SIGCONT)
        frozen = False

        async def admitted() -> str:
            ws, ack = await asyncio.wait_for(opening, 10)
            event = await next_event(ws, timeout=window + 5)  # TimeoutError: open for good
            return f"admitted ({ack['type']}) on a drained pod, then got {event}"

        with pytest.raises(ConnectionClosed) as refused:
            pytest.fail(await admitted())
        assert refused.value.rcvd is not None
        assert (refused.value.rcvd.code, refused.value.rcvd.reason) == (1012, "draining: reconnect")
    finally:
        if frozen and redis.process is not None:
            os.kill(redis.process.pid, signal.SIGCONT)
        await asyncio.to_thread(stack.stop)
        redis.cleanup()


class _Transport:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


class _Peer:
    """The ASGI side of one socket (its `send` a bound method, as uvicorn's): records what it
    gets; a close waits for `take_close` (a client slow to take it)."""

    def __init__(self) -> None:
        self.transport = _Transport()
        self.closes: list[int] = []
        self.close_started = asyncio.Event()
        self.take_close = asyncio.Event()

    async def send(self, message: Message) -> None:
        if message["type"] == "websocket.close":
            self.close_started.set()
            await self.take_close.wait()
            self.closes.append(message["code"])

    def connection(self) -> ClientConnection:
        conn = ClientConnection(
            connection_id=unique("c"), tenant_id="t", session_id="s", user_id="u",
            send=self.send, limit=10,
        )  # fmt: skip
        conn.go_live("0-0")
        return conn


def _runtime(*connections: ClientConnection) -> Runtime:
    hub = SimpleNamespace(connections=set(connections))
    return cast(Runtime, SimpleNamespace(hub=hub, draining=False, drained=None))


async def test_drain_closes_a_socket_attached_after_it_started() -> None:
    """A socket attached after the drain listed the pod's sockets (its handshake passed the
    check just before) is closed too: the drain looks again until none is left."""
    first, late = _Peer(), _Peer()
    runtime = _runtime(first.connection())
    draining = asyncio.create_task(drain(runtime, 0.1))
    await first.close_started.wait()  # the drain has its list: now a socket attaches
    runtime.hub.connections.add(late.connection())
    late.take_close.set()
    first.take_close.set()
    assert await asyncio.wait_for(draining, OVERRUN_SECONDS + 1) == 2
    assert (first.closes, late.closes) == ([1012], [1012])


async def test_drain_aborts_sockets_that_take_nothing_at_its_deadline() -> None:
    """Clients that never take their close frame hold the drain no longer than its window
    plus OVERRUN_SECONDS (it was the window, then 10 s per socket's close): their TCP
    connections are aborted."""
    window = 0.5
    stuck = [_Peer() for _ in range(3)]
    reading = _Peer()
    reading.take_close.set()
    runtime = _runtime(*(peer.connection() for peer in [*stuck, reading]))
    started = time.monotonic()
    assert await asyncio.wait_for(drain(runtime, window), window + OVERRUN_SECONDS + 1) == 4
    assert time.monotonic() - started < window + OVERRUN_SECONDS + 0.5
    assert [peer.transport.aborted for peer in stuck] == [True] * 3
    assert (reading.transport.aborted, reading.closes) == (False, [1012])

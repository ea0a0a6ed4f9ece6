"""ClientConnection against an in-process ASGI `send` shaped like uvicorn's (websockets-sansio
and wsproto): it waits while the transport is paused, then writes synchronously."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.api.connections import CLOSE_POLICY, ClientConnection, traced_frame
from services.core.events import NO_EVENT_ID


class Transport:
    """What the server's protocol does with ASGI messages: a write buffer and a pause flag."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.closed: tuple[int, str] | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.aborted = False
        self.transport = self  # uvicorn's protocols keep theirs here: what a timed-out close aborts

    async def send(self, message: dict[str, Any]) -> None:
        await self.writable.wait()
        if message["type"] == "websocket.send":
            self.written.append(message["text"])
        elif message["type"] == "websocket.close":
            self.closed = (message["code"], message["reason"])

    def abort(self) -> None:
        self.aborted = True


def connection(
    transport: Transport, limit: int = 3, char_limit: int = 4 * 1024 * 1024
) -> ClientConnection:
    conn = ClientConnection(
        connection_id="c",
        tenant_id="t",
        session_id="s",
        user_id="u",
        send=transport.send,
        limit=limit,
        char_limit=char_limit,
    )
    conn.go_live(NO_EVENT_ID)
    return conn


async def test_a_frame_is_written_at_once_without_a_task() -> None:
    transport = Transport()
    conn = connection(transport)
    conn.push("a")
    assert transport.written == ["a"]  # synchronously: no drain task was needed
    assert conn._drain is None
    assert conn._outbox is None


async def test_frames_keep_their_order_while_the_transport_is_paused() -> None:
    transport = Transport()
    conn = connection(transport, limit=10)
    conn.push("a")
    transport.writable.clear()
    conn.push("b")  # cannot be written now: finished by the drain task
    conn.push("c")
    conn.push("d")
    await asyncio.sleep(0.01)
    assert transport.written == ["a"]
    transport.writable.set()
    await conn.flush()
    assert transport.written == ["a", "b", "c", "d"]
    conn.push("e")  # the outbox is empty again: written at once
    assert transport.written == ["a", "b", "c", "d", "e"]
    assert conn._drain is None
    assert conn._outbox is None


async def test_a_client_that_stops_reading_is_closed_with_1008() -> None:
    transport = Transport()
    conn = connection(transport, limit=2)
    transport.writable.clear()
    for frame in "abcd":
        conn.push(frame)
    assert conn.closed
    await asyncio.sleep(0.01)
    assert transport.closed is None  # the close waits for the client too
    transport.writable.set()
    await conn.closing()
    assert transport.closed == (CLOSE_POLICY, "send queue full: client not reading")
    assert transport.written == []  # the cancelled send wrote nothing


async def test_a_client_that_stops_reading_large_frames_is_closed_before_the_count() -> None:
    """The queue was bounded by frames only: a socket that stopped reading, sent 1 000 frames
    of 200 KB (an AES's websocket.send has no size limit), held 200 MB. The characters queued
    are bounded too; replayed frames (bounded by the log) count against neither."""
    transport = Transport()
    conn = connection(transport, limit=1000, char_limit=2500)
    transport.writable.clear()
    conn.push("w" * 10)  # being written: not in the queue
    conn.push("x" * 1000)
    conn.push("y" * 1000)
    assert not conn.closed
    conn.push("z" * 1000)  # 3 000 characters queued: over
    assert conn.closed
    transport.writable.set()
    await conn.closing()
    assert transport.closed == (CLOSE_POLICY, "send queue full: client not reading")


async def test_the_character_budget_is_given_back_as_frames_are_written() -> None:
    transport = Transport()
    conn = connection(transport, limit=1000, char_limit=2500)
    for round_ in range(5):  # 10 000 characters in all, never more than 2 000 queued
        transport.writable.clear()
        conn.push("w")
        conn.push("x" * 1000)
        conn.push("y" * 1000)
        transport.writable.set()
        await conn.flush()
        assert not conn.closed, round_
    assert len(transport.written) == 15


async def test_a_client_that_never_reads_has_its_connection_aborted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("services.api.connections.CLOSE_TIMEOUT_SECONDS", 0.05)
    transport = Transport()
    conn = connection(transport, limit=1)
    transport.writable.clear()
    for frame in "abc":
        conn.push(frame)
    await conn.closing()
    assert transport.closed is None
    assert transport.aborted


async def test_events_not_newer_than_the_last_one_sent_are_dropped() -> None:
    transport = Transport()
    conn = ClientConnection(
        connection_id="c",
        tenant_id="t",
        session_id="s",
        user_id="u",
        send=transport.send,
        limit=3,
    )
    conn.deliver("5-0", "held 5")  # held during set-up
    conn.deliver("7-0", "held 7")
    conn.push("ack")
    conn.push("replayed 6")
    conn.go_live("6-0")
    conn.deliver("7-0", "again 7")
    conn.deliver("8-0", "live 8")
    assert transport.written == ["ack", "replayed 6", "held 7", "live 8"]
    assert conn.last_event_id == "8-0"


async def test_a_send_to_a_gone_client_marks_the_connection_closed() -> None:
    async def gone(message: dict[str, Any]) -> None:
        raise OSError("client disconnected")

    conn = ClientConnection(
        connection_id="c", tenant_id="t", session_id="s", user_id="u", send=gone, limit=3
    )
    conn.go_live(NO_EVENT_ID)
    conn.push("a")
    assert conn.closed


async def test_a_broadcast_during_set_up_waits_for_the_ack_and_carries_the_cursor() -> None:
    """A tenant broadcast has no log id: it carries the socket's cursor. One arriving while the
    socket is set up (ack, then the replay of a resume) goes out after them, with the cursor
    of the last replayed event, not before the ack with the cursor of nothing sent yet."""
    transport = Transport()
    conn = ClientConnection(
        connection_id="c", tenant_id="t", session_id="s", user_id="u", send=transport.send, limit=5
    )
    conn.broadcast('"type":"notice","data":{}}')
    conn.deliver("5-0", '{"id":"5-0","live":1}')  # live, arrived during the replay
    conn.push('{"id":"3-0","ack":1}')
    conn.push('{"id":"4-0","replayed":1}')
    conn.go_live("4-0")
    assert transport.written == [
        '{"id":"3-0","ack":1}',
        '{"id":"4-0","replayed":1}',
        '{"id":"4-0","type":"notice","data":{}}',  # in the order they arrived
        '{"id":"5-0","live":1}',
    ]
    conn.broadcast('"type":"notice","data":{}}')  # live now: at once, with the cursor
    assert transport.written[-1] == '{"id":"5-0","type":"notice","data":{}}'


async def test_a_traced_frame_that_is_not_written_still_ends_its_span() -> None:
    """A duplicate (already sent by a catch-up), one for a closed socket, and one dropped from
    a slow client's queue: each `websocket send` span ends, marked dropped."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    transport = Transport()
    conn = connection(transport, limit=1)
    conn.deliver("2-0", traced_frame('{"id":"2-0"}', tracer.start_span("sent")))
    conn.deliver("1-0", traced_frame('{"id":"1-0"}', tracer.start_span("duplicate")))
    transport.writable.clear()  # a client that stops reading
    conn.deliver("3-0", traced_frame('{"id":"3-0"}', tracer.start_span("in the drain")))
    conn.deliver("4-0", traced_frame('{"id":"4-0"}', tracer.start_span("queued")))
    conn.deliver("5-0", traced_frame('{"id":"5-0"}', tracer.start_span("over the limit")))
    conn.deliver("6-0", traced_frame('{"id":"6-0"}', tracer.start_span("socket closed")))
    transport.writable.set()
    await conn.closing()
    ended = {span.name: dict(span.attributes or {}) for span in exporter.get_finished_spans()}
    assert ended["sent"] == {}
    for name in ("duplicate", "queued", "over the limit", "socket closed"):
        assert ended[name] == {"orchestrator.dropped": True}, name


class Gate(Transport):
    """A client that reads exactly as many frames as it is allowed to."""

    def __init__(self) -> None:
        super().__init__()
        self.permits = asyncio.Semaphore(0)

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            await self.permits.acquire()
        await super().send(message)


async def test_live_frames_queued_before_a_catch_up_are_not_counted_as_replayed() -> None:
    """Live frames were queued, then a catch-up queued its replay behind them: the drain
    gave the live frames' places back to the replay's allowance and never their characters,
    so a client reading at its pace was closed 1008 "send queue full" while the replay
    drained."""
    transport = Gate()
    conn = connection(transport, limit=2)
    for frame in "abc":  # "a" being written, "b" and "c" queued: the live limit
        conn.push(frame)
    conn.hold()  # a catch-up re-reads the log
    for n in range(5):
        conn.push(f"r{n}")
    conn.go_live(NO_EVENT_ID)
    for _ in range(3):
        transport.permits.release()
    while len(transport.written) < 3:
        await asyncio.sleep(0)  # the drain task writes one frame per permit
    conn.push("d")  # two live frames queued behind the replayed ones: within the limit
    conn.push("e")
    assert not conn.closed
    for _ in range(7):
        transport.permits.release()
    await conn.flush()
    assert transport.written == ["a", "b", "c", "r0", "r1", "r2", "r3", "r4", "d", "e"]

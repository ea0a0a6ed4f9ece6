"""uvicorn's httptools protocol with the bounds its h11 protocol has and httptools lacks.

httptools (the faster parser, chosen for the send path) keeps every byte of a request's URL
and headers for as long as they come, and nothing times out a request head that never ends:
a client with no token could fill the api's memory with one endless header block, or hold any
number of connections open by sending half a request line (slow loris). Both before any
authentication. Behind an ingress these are bounded by the proxy; exposed directly, nothing
else bounds them.

So a request head (request line and headers, also of a WebSocket handshake) may take at most
`max_head_bytes` and `head_timeout` seconds (ORCHESTRATOR_HTTP_MAX_HEAD_BYTES and
ORCHESTRATOR_HTTP_HEAD_TIMEOUT_SECONDS, through `bounded_protocol`); beyond either the
connection gets a 400 (size) or is closed (time). A connection that sends nothing at all is
closed after the same time.

The size is counted on the bytes fed to the parser while a head is incomplete, not in the
parser's callbacks: httptools calls `on_header` only once a value has ended, so one endless
header value never reached a count. A read that holds more than the room left is fed in two
parts, so a body arriving in the same read as its head's end is not counted as head. (The head
of a request pipelined right behind a body, in the same read, starts uncounted: at most one
read, 256 KB, more.)

A request body is bounded like nginx's `client_body_timeout`: no byte of it for `head_timeout`
seconds between two reads, and the connection gets a 408 (or is closed, if a response has
started). Litestar reads a body before it resolves the caller, so a body that never ends held a
connection for ever, without a token. Only the client's silence counts: not while uvicorn has
paused reading because the application has not taken what came yet, nor while the client waits
for a `100 Continue`. A slow upload that keeps sending is never cut, however long it takes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol


class TooManyHeaders(Exception):
    """Raised inside a parser callback: httptools turns it into a parser error, which uvicorn
    answers with 400 and a close."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = 64 * 1024  # h11's default is 16 KB; tokens in a query string can be long
    # Apache's LimitRequestFields. Within the head's bytes, 65 000 one-byte headers made ~8 MB
    # of Python objects per request (120x what the client sent); a browser sends ~20.
    max_header_count = 100
    head_timeout = 10.0  # also the longest silence within a request body

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # until a head ends, and again once its message has ended
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._upgraded = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        while data and self._in_head:
            data = self._feed_head(data)
        if data:
            super().data_received(data)
        if not self._in_head and not self._upgraded and not self.transport.is_closing():
            self._start_body_timer()

    def _feed_head(self, data: bytes) -> bytes:
        """Feed what fits in the head's room left, counted; return the rest, not yet fed (empty
        once the connection is answered, closed or handed to the WebSocket protocol)."""
        room = self.max_head_bytes - self._head_bytes
        piece, rest = data[:room], data[room:]
        self._head_bytes += len(piece)
        super().data_received(piece)
        if self._upgraded or self.transport.is_closing():
            return b""
        if self._in_head and self._head_bytes >= self.max_head_bytes:
            self._answer_and_close(
                400, "bad_request", f"request head over {self.max_head_bytes} bytes"
            )
            return b""
        return rest

    def handle_websocket_upgrade(self) -> None:
        """From here the WebSocket protocol reads the transport: no more feeding, no timers."""
        self._upgraded = True
        self._stop_body_timer()
        super().handle_websocket_upgrade()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_head_timer()  # the next request of a kept-alive connection

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.max_header_count:
            raise TooManyHeaders(f"more than {self.max_header_count} header fields")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._stop_body_timer()
        super().on_message_complete()

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _start_body_timer(self, delay: float | None = None) -> None:
        """Armed once per body, not per read: each read only stamps `_last_read`, and the
        timer looks at that stamp when it fires."""
        if self._body_timer is None:
            when = self.head_timeout if delay is None else delay
            self._body_timer = self.loop.call_later(when, self._body_check)

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_check(self) -> None:
        self._body_timer = None
        if self._in_head or self._upgraded or self.transport.is_closing():
            return
        if self._waiting_on_the_server():
            self._last_read = self.loop.time()  # the silence so far is not the client's
        idle = self.loop.time() - self._last_read
        if idle < self.head_timeout:
            self._start_body_timer(self.head_timeout - idle)
        else:
            self._body_too_slow()

    def _waiting_on_the_server(self) -> bool:
        """Whether the client may rightly be silent: uvicorn stopped reading (the application
        has not taken the body read so far), or a `100 Continue` was not sent yet."""
        cycle = self.cycle
        return self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue)

    def _body_too_slow(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()
        else:
            self._answer_and_close(
                408,
                "request_timeout",
                f"no byte of the request body for {self.head_timeout:g} s",
            )
        if cycle is not None:
            # The application's `receive` gets `http.disconnect` now, and its `send` writes
            # nothing after our answer.
            cycle.disconnected = True
            cycle.message_event.set()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request httptools could not parse (too many header fields
        among them), in the api's error shape instead of its plain text. uvicorn has logged
        it already."""
        self._answer_and_close(400, "bad_request", msg.rstrip(".").lower(), logged=True)

    def _answer_and_close(
        self, status: int, code: str, message: str, *, logged: bool = False
    ) -> None:
        """An answer in the api's error shape (`{"error": {"code", "message", "details"}}`,
        README), with `connection: close`, written as uvicorn writes its own 400: a client
        parsing every error as README says must not meet plain text here."""
        if not logged:
            self.logger.warning("%s.", message)
        body = json.dumps({"error": {"code": code, "message": message, "details": {}}}).encode()
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()


def bounded_protocol(max_head_bytes: int, head_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=`, with these bounds (`head_timeout` also bounds
    the silence within a request body)."""
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {"max_head_bytes": max_head_bytes, "head_timeout": head_timeout},
    )

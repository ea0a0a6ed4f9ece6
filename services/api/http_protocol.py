"""uvicorn's httptools protocol with the two bounds its h11 protocol has and httptools lacks.

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
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeadTooLarge(Exception):
    """Raised inside a parser callback: httptools turns it into a parser error, which uvicorn
    answers with 400 and a close."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = 64 * 1024  # h11's default is 16 KB; tokens in a query string can be long
    head_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._start_head_timer()  # the next request of a kept-alive connection

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            raise HeadTooLarge(f"request head over {self.max_head_bytes} bytes")

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


def bounded_protocol(max_head_bytes: int, head_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=`, with these bounds."""
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {"max_head_bytes": max_head_bytes, "head_timeout": head_timeout},
    )

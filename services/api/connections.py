"""One client socket as the delivery side sees it: an ordered, bounded outbox.

Frames are queued without waiting, and a drain task, started only while frames are waiting,
writes them to the socket. A slow client therefore never stalls the delivery loop or other
sockets; one that falls `send_queue` frames behind is closed with 1008. An idle socket holds
no task beyond its own receive loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from opentelemetry.trace import Span

from services.api import metrics
from services.core.events import NO_EVENT_ID, parse_event_id

log = logging.getLogger(__name__)

SendText = Callable[[str], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]

CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_RESTART = 1012
CLOSE_INTERNAL = 1011

FLUSH_TIMEOUT_SECONDS = 2.0


class TracedFrame(str):
    """A frame whose `websocket send` span ends when the frame is written to the socket."""

    __slots__ = ("span",)
    span: Span


def traced_frame(text: str, span: Span) -> TracedFrame:
    frame = TracedFrame(text)
    frame.span = span
    return frame


class ClientConnection:
    """A socket of one session on this pod, with the id of the last event it was given."""

    __slots__ = (
        "_close",
        "_closing",
        "_drain",
        "_held",
        "_limit",
        "_outbox",
        "_replay_left",
        "_send",
        "closed",
        "connection_id",
        "last_event_id",
        "session_id",
        "tenant_id",
        "user_id",
    )

    def __init__(
        self,
        *,
        connection_id: str,
        tenant_id: str,
        session_id: str,
        user_id: str,
        send: SendText,
        close: Close,
        limit: int,
    ) -> None:
        self.connection_id = connection_id
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.user_id = user_id
        self.last_event_id = NO_EVENT_ID
        self.closed = False
        self._send = send
        self._close = close
        self._limit = limit
        self._outbox: deque[str] = deque()
        # Frames queued while held (the ack and the replay of a resume or a catch-up): bounded
        # by the session log, not by the client's reading, so not counted against `limit`.
        self._replay_left = 0
        self._drain: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        # While the connection is being set up (resume), live events wait here.
        self._held: list[tuple[str, str]] | None = []

    def deliver(self, event_id: str, frame: str) -> None:
        """A session event (with its log id); held during set-up, queued afterwards."""
        if self._held is not None:
            self._held.append((event_id, frame))
            return
        if parse_event_id(event_id) <= parse_event_id(self.last_event_id):
            # Already sent: a catch-up read it from the log while it was still on its way
            # through the (separate) subscription connection.
            return
        self.last_event_id = event_id
        self.push(frame)

    def push(self, frame: str) -> None:
        """Queue a frame for the client without waiting."""
        if self.closed:
            return
        if self._held is not None:
            self._replay_left += 1
        elif len(self._outbox) >= self._limit + self._replay_left:
            metrics.websocket_refusals.labels("slow_client").inc()
            self.close_soon(CLOSE_POLICY, "send queue full: client not reading")
            return
        self._outbox.append(frame)
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_outbox())

    def hold(self) -> None:
        """Hold live events (while the events since `last_event_id` are re-read)."""
        if self._held is None:
            self._held = []

    def go_live(self, sent_up_to: str) -> None:
        """End set-up: queue held events newer than `sent_up_to`, then deliver live."""
        held, self._held = self._held or [], None
        self.last_event_id = sent_up_to
        floor = parse_event_id(sent_up_to)
        for event_id, frame in held:
            if parse_event_id(event_id) > floor:
                self.last_event_id = event_id
                self.push(frame)

    async def _drain_outbox(self) -> None:
        try:
            while self._outbox and not self.closed:
                frame = self._outbox.popleft()
                await self._send(frame)
                if self._replay_left:
                    self._replay_left -= 1
                metrics.websocket_messages.labels("out").inc()
                if type(frame) is TracedFrame:
                    frame.span.end()  # the traced final event is on the wire
        except Exception:  # the peer went away mid-send; the receive loop sees it too
            self.closed = True
        finally:
            self._drain = None

    def close_soon(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._outbox.clear()
        # A send may be blocked on a client that does not read. Stop it first: the server's
        # websocket protocol allows one writer at a time, and a close written alongside a
        # blocked send fails (legacy `websockets` asserts), which left the socket half-closed
        # and never torn down. The frame being sent is already whole in the transport buffer.
        drain = self._drain
        if drain is not None:
            drain.cancel()
        self._closing = asyncio.get_running_loop().create_task(
            self._close_quietly(code, reason, drain)
        )

    async def closing(self) -> None:
        """Wait for a close started by `close_soon` to be sent."""
        if self._closing is not None:
            await self._closing

    async def _close_quietly(
        self, code: int, reason: str, drain: asyncio.Task[None] | None
    ) -> None:
        if drain is not None:
            await asyncio.wait([drain])  # never raises: the send's cancellation is expected
        try:
            await self._close(code, reason)
        except Exception as exc:  # the peer is gone already; the receive loop ends the socket
            log.debug("close of %s failed: %r", self.connection_id, exc)

    async def flush(self) -> None:
        """Wait until every queued frame was written (used before an orderly close).

        Bounded: a client that does not read must not hold up a drain of the whole pod.
        """
        drain = self._drain
        if drain is not None:
            await asyncio.wait([drain], timeout=FLUSH_TIMEOUT_SECONDS)

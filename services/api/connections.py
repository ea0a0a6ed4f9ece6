"""One client socket as the delivery side sees it: an ordered, bounded outbox.

A frame is written to the socket at once when nothing is waiting before it and the socket
takes it without waiting (the usual case: one synchronous transport write, no task). When the
socket cannot take it (the transport's buffer is full: a slow client), that write and every
later frame are finished by a drain task, started only while frames are waiting. A slow client
therefore never stalls the delivery loop or other sockets; one that falls `send_queue` frames
behind is closed with 1008. An idle socket holds no task and no queue beyond its own receive
loop.

The connection keeps the raw ASGI `send` of its socket (no wrappers): frames go out as
`websocket.send` messages, the close as `websocket.close`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import CoroutineType
from typing import Any

from opentelemetry.trace import Span

from services.api import metrics
from services.core.events import NO_EVENT_ID, frame_with_id, parse_event_id

log = logging.getLogger(__name__)

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]  # the ASGI `send` of the socket

CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_RESTART = 1012
CLOSE_INTERNAL = 1011

FLUSH_TIMEOUT_SECONDS = 2.0
# How long a client gets to take our close frame into its socket; after that (it does not read
# at all) its TCP connection is aborted, or its buffered frames would hold the socket for ever.
CLOSE_TIMEOUT_SECONDS = 10.0

_SENT = metrics.websocket_messages.labels("out")
_SLOW_CLIENT = metrics.websocket_refusals.labels("slow_client")


class TracedFrame(str):
    """A frame whose `websocket send` span ends when the frame is written to the socket."""

    __slots__ = ("span",)
    span: Span


def traced_frame(text: str, span: Span) -> TracedFrame:
    frame = TracedFrame(text)
    frame.span = span
    return frame


def _sent(frame: str) -> None:
    _SENT.inc()
    if type(frame) is TracedFrame:
        frame.span.end()  # the traced final event is on the wire


def _dropped(frame: str) -> None:
    """A frame that will not be written (already sent, or its socket is closing): its span
    ends anyway, or the trace would miss it and the SDK hold it open."""
    if type(frame) is TracedFrame:
        frame.span.set_attribute("orchestrator.dropped", True)
        frame.span.end()


class _Suspended:
    """Awaits a send coroutine that already ran up to its first suspension (the transport was
    paused): re-yields what it waits for to the task, then lets it run to its end."""

    __slots__ = ("_coro", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self._coro = coro
        self._waiting = waiting

    def __await__(self) -> Generator[Any, None, None]:
        try:
            yield self._waiting
        except BaseException:  # cancelled while waiting: unwind the send where it stopped
            self._coro.close()
            raise
        yield from self._coro.__await__()


def abort_transport(send: Send) -> bool:
    """Drop the TCP connection behind an ASGI `send` (uvicorn's protocol objects keep their
    transport). ASGI has no message for this; a server without it keeps the socket."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if abort is None:
        return False
    abort()
    return True


class ClientConnection:
    """A socket of one session on this pod, with the id of the last event it was given."""

    __slots__ = (
        "_char_limit",
        "_closing",
        "_drain",
        "_held",
        "_limit",
        "_live_chars",
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
        send: Send,
        limit: int,
        char_limit: int = 4 * 1024 * 1024,
    ) -> None:
        self.connection_id = connection_id
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.user_id = user_id
        self.last_event_id = NO_EVENT_ID
        self.closed = False
        self._send = send
        self._limit = limit
        # Live frames queued may also not add up to more than `char_limit` characters: a few
        # slow sockets sent large messages would otherwise hold hundreds of MB each.
        self._char_limit = char_limit
        self._live_chars = 0
        # Frames waiting for the drain task; made when first needed (an empty deque is 0.6 KB
        # per socket) and dropped when the drain task is done.
        # Each with whether it was queued while held (the ack and the replay of a resume or a
        # catch-up): those are bounded by the session log, not by the client's reading, so
        # not counted against `limit`. The mark travels with the frame: live frames queued
        # before a catch-up are written before its replay, and must give back what they took.
        self._outbox: deque[tuple[str, bool]] | None = None
        self._replay_left = 0
        self._drain: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        # While the connection is being set up (resume), live events wait here.
        # (None: a tenant broadcast, which has no log id of its own.)
        self._held: list[tuple[str | None, str]] | None = []

    def deliver(self, event_id: str, frame: str) -> None:
        """A session event (with its log id); held during set-up, queued afterwards."""
        if self._held is not None:
            self._held.append((event_id, frame))
            return
        if parse_event_id(event_id) <= parse_event_id(self.last_event_id):
            # Already sent: a catch-up read it from the log while it was still on its way
            # through the (separate) subscription connection.
            _dropped(frame)
            return
        self.last_event_id = event_id
        self.push(frame)

    def broadcast(self, body: str) -> None:
        """A tenant broadcast: not in the session log, so it carries the socket's cursor.
        Held during set-up like session events: nothing may precede `connection.ack`, and a
        cursor taken before the replay would point a resume at events already sent."""
        if self._held is not None:
            self._held.append((None, body))
            return
        self.push(frame_with_id(self.last_event_id, body))

    def push(self, frame: str) -> None:
        """Send a frame to the client without waiting (queued if the socket is busy)."""
        if self.closed:
            _dropped(frame)
            return
        outbox = self._outbox
        if self._drain is None:
            self._write(frame)
            return
        if outbox is None:
            outbox = self._outbox = deque()
        replayed = self._held is not None
        if replayed:
            self._replay_left += 1
        elif (
            len(outbox) >= self._limit + self._replay_left
            or self._live_chars + len(frame) > self._char_limit
        ):
            _SLOW_CLIENT.inc()
            self.close_soon(CLOSE_POLICY, "send queue full: client not reading")
            _dropped(frame)
            return
        else:
            self._live_chars += len(frame)
        outbox.append((frame, replayed))

    def _write(self, frame: str) -> None:
        """Write at once; if the socket cannot take the frame now, a drain task finishes it."""
        sending = self._send({"type": "websocket.send", "text": frame})
        if type(sending) is not CoroutineType:  # some other awaitable: always via the task
            self._drain = asyncio.get_running_loop().create_task(self._drain_outbox(sending, frame))
            return
        try:
            waiting = sending.send(None)
        except StopIteration:
            _sent(frame)
            return
        except Exception:  # the peer went away; the receive loop sees it too
            self.closed = True
            return
        self._drain = asyncio.get_running_loop().create_task(
            self._drain_outbox(_Suspended(sending, waiting), frame)
        )

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
            if event_id is None:
                self.push(frame_with_id(self.last_event_id, frame))
            elif parse_event_id(event_id) > floor:
                self.last_event_id = event_id
                self.push(frame)
            else:
                _dropped(frame)  # in the replay already

    async def _drain_outbox(self, pending: Awaitable[None], first: str) -> None:
        """Finish the write that could not complete at once, then the frames queued behind."""
        send = self._send
        writing: str | None = first
        try:
            await pending
            _sent(first)
            writing = None
            outbox = self._outbox
            while outbox and not self.closed:
                writing, replayed = outbox.popleft()
                await send({"type": "websocket.send", "text": writing})
                if replayed:
                    self._replay_left -= 1
                else:
                    self._live_chars -= len(writing)
                _sent(writing)
                writing = None
        except Exception:  # the peer went away mid-send; the receive loop sees it too
            self.closed = True
        finally:
            if writing is not None:  # its write failed or was stopped by a close
                _dropped(writing)
            for frame, _ in self._outbox or ():  # the peer went away: never to be written
                _dropped(frame)
            self._drain = None
            self._outbox = None
            self._replay_left = 0
            self._live_chars = 0

    def close_soon(self, code: int, reason: str) -> None:
        if self.closed:
            return
        drain = self._stop_sending()
        self._closing = asyncio.get_running_loop().create_task(
            self._close_quietly(code, reason, drain)
        )

    def _stop_sending(self) -> asyncio.Task[None] | None:
        """Mark the socket closed and drop what waits to be written; return the drain task.

        A send may be waiting for a client that does not read. It is stopped (cancelled): the
        frames behind it are dropped anyway, and a close must not queue behind them.
        """
        self.closed = True
        for frame, _ in self._outbox or ():
            _dropped(frame)
        self._outbox = None
        self._replay_left = 0
        self._live_chars = 0
        drain = self._drain
        if drain is not None:
            drain.cancel()
        return drain

    async def closing(self) -> None:
        """Wait for a close started by `close_soon` to be sent (or given up by `abort`).

        Never raises: an aborted close is cancelled, and the socket's handler awaits this in
        its `finally`, where a CancelledError would end it as if it were cancelled itself.
        """
        if self._closing is not None:
            await asyncio.wait([self._closing])

    def abort(self) -> None:
        """Drop the TCP connection now, unsent frames and close frame included.

        For a drain out of time: a client that takes neither its frames nor the close frame
        must not keep the pod past its grace period. The client sees the connection drop
        (1006) and reconnects with its `last_event_id` like after a 1012.
        """
        self._stop_sending()
        if self._closing is not None:
            self._closing.cancel()
        abort_transport(self._send)

    async def _close_quietly(
        self, code: int, reason: str, drain: asyncio.Task[None] | None
    ) -> None:
        if drain is not None:
            await asyncio.wait([drain])  # never raises: the send's cancellation is expected
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except TimeoutError:
            # The client takes nothing: its socket buffers are full. Drop the connection.
            log.info("socket %s does not read; aborting its connection", self.connection_id)
            abort_transport(self._send)
        except Exception as exc:  # the peer is gone already; the receive loop ends the socket
            log.debug("close of %s failed: %r", self.connection_id, exc)

    async def flush(self) -> None:
        """Wait until every queued frame was written (used before an orderly close).

        Bounded: a client that does not read must not hold up a drain of the whole pod.
        """
        drain = self._drain
        if drain is not None:
            await asyncio.wait([drain], timeout=FLUSH_TIMEOUT_SECONDS)

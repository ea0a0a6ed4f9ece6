"""uvicorn's wsproto protocol, bounded against clients that do not read or send deflate bombs.

uvicorn's `WSProtocol` trusts the peer in three places:

- it writes a pong per received ping into the transport whatever its write buffer holds, so
  a client that sends pings and reads nothing grows the api by what it sends;
- with permessage-deflate it lets wsproto inflate every frame with no output bound and checks
  `ws_max_size` only afterwards: a 64 KB frame costs hundreds of MB;
- on a keepalive timeout (and at the end of its own close handshake) it calls
  `transport.close()`, which waits to flush what a client that stopped reading never takes:
  `connection_lost` never comes, so the app never sees the disconnect and keeps the socket
  counted for ever.

`BoundedWSProtocol` keeps uvicorn's behaviour otherwise (same parser, same per-socket state
but one flag): it stops reading while the transport's writes are paused (backpressure, not
dropping: the client's own TCP window stops it), inflates at most `ws_max_size` bytes per
message (close 1009 beyond), and aborts a transport that a close could not flush.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Coroutine
from typing import Any, ClassVar

import wsproto
from uvicorn.config import Config
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
from uvicorn.server import ServerState
from wsproto import ConnectionType
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Event
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

_QUOTED_VALUE = re.compile(r'=\s*"([^"]*)"')


class BoundedPerMessageDeflate(PerMessageDeflate):
    """permessage-deflate that refuses (1009) a message inflating past `max_message_bytes`.

    wsproto's decompress call has no output bound; here each chunk is inflated with
    `max_length` set to what the message may still grow, so a bomb costs at most the limit.
    """

    def __init__(self, max_message_bytes: int) -> None:
        super().__init__()
        self._max_message_bytes = max_message_bytes
        self._inflated = 0  # bytes inflated so far in the message being received
        # While a control frame is read: the state of the message it came in the middle of.
        self._message_state: tuple[bool | None, bool | None] | None = None

    def accept(self, offer: str) -> bool | str | None:
        """wsproto's, reading RFC 7692's quoted values (`server_max_window_bits="10"`) and
        declining an offer it cannot read: its int() raised out of the handshake, which then
        got no answer at all (uvicorn had marked it complete)."""
        try:
            return super().accept(_QUOTED_VALUE.sub(r"=\1", offer))
        except ValueError:
            return None

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        """A control frame may come between the fragments of a message (RFC 6455 5.4); its
        end reset wsproto's state of that message, so the rest of a compressed message was
        taken as uncompressed (1007, or corrupt text handed on). Kept aside and restored."""
        if opcode.iscontrol():
            self._message_state = (self._inbound_compressed, self._inbound_is_compressible)
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        room = self._max_message_bytes - self._inflated
        try:
            # room + 1 (never 0, which zlib reads as "no bound"): one byte over says too big.
            inflated = self._decompressor.decompress(bytes(data), room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        return self._count(inflated)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if self._message_state is not None:  # the end of a control frame, not of a message
            self._inbound_compressed, self._inbound_is_compressible = self._message_state
            self._message_state = None
            return None
        tail = super().frame_inbound_complete(proto, fin)
        counted = self._count(tail) if isinstance(tail, bytes) else tail
        if fin:
            self._inflated = 0
        return counted

    def _count(self, inflated: bytes) -> bytes | CloseReason:
        self._inflated += len(inflated)
        if self._inflated > self._max_message_bytes:
            return CloseReason.MESSAGE_TOO_BIG
        return inflated


class _BoundedDeflateConnection(wsproto.WSConnection):
    """Swaps uvicorn's inline `PerMessageDeflate()` for the bounded one when accepting.

    uvicorn builds the extension inside `send()`; replacing it in the accept event keeps
    uvicorn's code (and its module globals) untouched.
    """

    def __init__(self, max_message_bytes: int) -> None:
        super().__init__(ConnectionType.SERVER)
        self._max_message_bytes = max_message_bytes

    def send(self, event: Event) -> bytes:
        if isinstance(event, AcceptConnection) and event.extensions:
            extensions = [
                BoundedPerMessageDeflate(self._max_message_bytes)
                if type(extension) is PerMessageDeflate
                else extension
                for extension in event.extensions
            ]
            event = dataclasses.replace(event, extensions=extensions)
        return super().send(event)


class BoundedWSProtocol(WSProtocol):
    """uvicorn's wsproto protocol with backpressure on reads, bounded inflation, and aborts
    where uvicorn's close would wait for ever on a client that does not read."""

    # The uvicorn implementation (its `ws=` name) this one extends: bench/ runs its peer
    # servers on it, the same parser.
    uvicorn_implementation: ClassVar[str] = "wsproto"

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: Any = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.writes_paused = False
        if config.ws_per_message_deflate:
            self.conn = _BoundedDeflateConnection(config.ws_max_size)

    # Backpressure: a client that does not read stops being read.

    def pause_writing(self) -> None:
        """The write buffer is over its high-water mark: stop reading, so nothing the client
        sends (pings above all, each answered by a pong) can make the api buffer more."""
        super().pause_writing()
        self.writes_paused = True
        if not self.read_paused:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.writes_paused = False
        self._resume_reading()

    def _resume_reading(self) -> None:
        """Read again unless a reason to pause remains (an unconsumed message, full writes)."""
        if not self.read_paused and not self.writes_paused and not self.transport.is_closing():
            self.transport.resume_reading()

    async def receive(self) -> Any:
        """uvicorn's, but reading resumes only when the writes are not paused either."""
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            self._resume_reading()
        return message

    def handle_close(self, event: CloseConnection) -> None:
        """wsproto reports a frame it refused (an inflated message over the limit, bad UTF-8)
        as a close from the peer while the connection is still open, and uvicorn answers
        only a peer's close: send the close code (1009, 1007...) so the client learns why."""
        if not self.close_sent and self.conn.state is ConnectionState.OPEN:
            self.transport.write(self.conn.send(CloseConnection(event.code, event.reason)))
        super().handle_close(event)

    # Closes that a client which does not read cannot hold open.

    def keepalive_timeout(self) -> None:
        """uvicorn writes a close frame and closes, which waits to flush what the client does
        not read: abort instead when the frame could not be flushed, so the app sees the
        disconnect (`connection_lost`) and uncounts the socket."""
        super().keepalive_timeout()
        self._abort_if_unflushed()

    def send(self, message: Any) -> Coroutine[Any, Any, None]:
        """uvicorn's send; the app's close goes through `_send_close`. Not a coroutine of its
        own, so the hot path (websocket.send) costs no extra frame."""
        if message["type"] == "websocket.close":
            return self._send_close(message)
        return super().send(message)

    async def _send_close(self, message: Any) -> None:
        await super().send(message)
        if self.close_timer is not None:
            # uvicorn's timer only closes: after its timeout, abort if still unflushed.
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self._close_or_abort)

    def _close_or_abort(self) -> None:
        self.close_timer = None
        self.transport.close()
        self._abort_if_unflushed()

    def _abort_if_unflushed(self) -> None:
        if not self.disconnected and self.transport.get_write_buffer_size():
            self.transport.abort()

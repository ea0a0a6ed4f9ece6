"""Lean RFC 6455 WebSocket and HTTP/1.1 keep-alive clients on asyncio protocols.

The client processes share the two cores with the servers they measure, so every frame they
parse costs the servers CPU. These clients do the minimum a correct client must: the upgrade
handshake (checking `Sec-WebSocket-Accept`), masked client frames, unmasked server frames of
any length (fragmented messages reassembled), pong for ping, close. No compression is offered.
Both sides of every comparison use these same clients.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Callable
from typing import Any

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class HandshakeError(ConnectionError):
    pass


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    if not n:
        return key
    stream = (key * (n // 4 + 1))[:n]
    return key + (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + _mask(payload)


class WsClient(asyncio.Protocol):
    """One client socket. `on_text(bytes)` is called for every complete text message."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        on_text: Callable[[WsClient, bytes], None],
        subprotocols: list[str] | None = None,
    ) -> None:
        self.on_text = on_text
        key = base64.b64encode(os.urandom(16))
        self._accept = base64.b64encode(hashlib.sha1(key + GUID).digest())  # noqa: S324
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key.decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if subprotocols:
            lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
        self._request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self._buffer = bytearray()
        self._upgraded = False
        self._fragments: list[bytes] = []
        self.transport: Any = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        path: str,
        on_text: Callable[[WsClient, bytes], None],
        subprotocols: list[str] | None = None,
    ) -> WsClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(
            lambda: cls(host, port, path, on_text, subprotocols), host, port
        )
        await client.opened
        return client

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # uvloop's are no asyncio.Transport
        self.transport = transport
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" " or self._accept not in head:
                self.opened.set_exception(HandshakeError(status.decode(errors="replace")))
                self._abort()
                return
            self._upgraded = True
            self.opened.set_result(None)
        pos = 0
        size = len(buffer)
        while size - pos >= 2:
            b0 = buffer[pos]
            length = buffer[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            self._frame(b0, bytes(buffer[start:end]))
            pos = end
        if pos:
            del buffer[:pos]

    # frames ------------------------------------------------------------------------------------

    def _frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        if opcode in (OP_TEXT, OP_BINARY):
            if fin:
                self.on_text(self, payload)
            else:
                self._fragments = [payload]
        elif opcode == OP_CONT:
            self._fragments.append(payload)
            if fin:
                message = b"".join(self._fragments)
                self._fragments = []
                self.on_text(self, message)
        elif opcode == OP_PING:
            self._write(client_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._write(client_frame(OP_CLOSE, payload[:2]))
            self._abort()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def send_text(self, text: str | bytes) -> None:
        self._write(client_frame(OP_TEXT, text.encode() if isinstance(text, str) else text))

    def close(self, code: int = 1000) -> None:
        self._write(client_frame(OP_CLOSE, code.to_bytes(2, "big")))
        self._abort()


class HttpClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; `request()` sends one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self._host = f"{host}:{port}".encode()
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._head: tuple[int, int] | None = None  # (status, content length)
        self.transport: Any = None
        self.lost = False

    @classmethod
    async def connect(cls, host: str, port: int) -> HttpClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(lambda: cls(host, port), host, port)
        return client

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionError("connection closed"))

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        if self.lost:
            raise ConnectionError("connection closed")
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + self._host]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}".encode())
        lines.append(b"Content-Length: " + str(len(body)).encode())
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            if self._head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).split(b"\r\n")
                del buffer[: end + 4]
                status = int(head[0].split(b" ", 2)[1])
                length = -1
                for line in head[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if length < 0:
                    self._fail(ConnectionError("response without Content-Length"))
                    return
                self._head = (status, length)
            status, length = self._head
            if len(buffer) < length:
                return
            body = bytes(buffer[:length])
            del buffer[:length]
            self._head = None
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result((status, body))

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

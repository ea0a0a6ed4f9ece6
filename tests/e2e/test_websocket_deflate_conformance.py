"""RFC 6455 / RFC 7692 conformance of `/ws/{tenant}/{session}` on real api processes."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import zlib
from collections.abc import Iterator

import pytest

from services.cli.embedded import RedisServer
from services.cli.stack import Child
from tests.e2e.clients import token, unique
from tests.e2e.conftest import lone_api
from tests.e2e.test_socket_bounds import open_raw, read_frame_head

OP_CONT, OP_TEXT, OP_BIN, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
FIN, RSV1 = 0x80, 0x40
DEFLATE = "Sec-WebSocket-Extensions: permessage-deflate\r\n"


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame with the flags given."""
    n = len(payload)
    head = bytes(((FIN if fin else 0) | rsv | opcode,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += bytes((0x80 | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((0x80 | 127,)) + struct.pack("!Q", n)
    key = os.urandom(4)
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + masked


class Peer:
    """A raw socket after the handshake, with an inflater when deflate was agreed."""

    def __init__(self, api: Child, *, deflate: bool = False) -> None:
        self.tenant = unique("t")
        self.sock, self.buf = open_raw(
            api.port, self.tenant, unique("s"), extra=DEFLATE if deflate else ""
        )
        self.deflate = deflate
        self.inflater = zlib.decompressobj(-15)
        self.compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)

    def read(self) -> tuple[int, bytes]:
        """One server frame (opcode, payload), inflated when RSV1 is set."""
        b0, payload = read_frame_head(self.sock, self.buf)
        if b0 & RSV1:
            payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
        return b0 & 0x0F, payload

    def read_json(self) -> dict:
        while True:
            op, payload = self.read()
            if op == OP_TEXT:
                return json.loads(payload)
            if op == OP_CLOSE:
                raise AssertionError(f"closed: {payload!r}")

    def compress(self, data: bytes) -> bytes:
        return self.compressor.compress(data) + self.compressor.flush(zlib.Z_SYNC_FLUSH)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def deflate_api(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    with lone_api(
        e2e_redis, tmp_path_factory.mktemp("logs"), websocket_compression="true"
    ) as child:
        yield child


def test_ping_between_compressed_fragments_keeps_the_message(deflate_api: Child) -> None:
    """RFC 6455 5.4: control frames MAY be injected in the middle of a fragmented message;
    RFC 7692 compresses the message, not the ping. A compressed `{"type":"ping"}` sent in two
    fragments with a ping between them is a valid message: the api must answer the control
    ping with a pong and the app ping with a `pong` event, not fail the connection."""
    peer = Peer(deflate_api, deflate=True)
    try:
        assert peer.read_json()["type"] == "connection.ack"
        body = json.dumps({"type": "ping", "data": {"pad": "xé" * 100}}).encode()

        def message(ping: bytes) -> bytes:
            first = peer.compress(body[:101])  # keeps its sync-flush tail: mid-message
            rest = peer.compress(body[101:]).removesuffix(b"\x00\x00\xff\xff")
            return frame(OP_TEXT, first, fin=False, rsv=RSV1) + ping + frame(OP_CONT, rest)

        peer.send(message(b""))  # the same message without the ping: understood
        assert peer.read_json()["type"] == "pong"
        peer.send(message(frame(OP_PING, b"between")))
        assert peer.read() == (OP_PONG, b"between")
        op, payload = peer.read()
        assert op == OP_TEXT, (
            f"a compressed message with a ping between its fragments failed the connection: "
            f"close code {struct.unpack('!H', payload[:2])[0] if op == OP_CLOSE else op}, "
            f"reason {payload[2:]!r} (expected the app's pong event)"
        )
        assert json.loads(payload)["type"] == "pong"
    finally:
        peer.close()


@pytest.mark.parametrize(
    "offer",
    [
        # RFC 7692 7.1 / RFC 6455 9.1: a parameter value may be a quoted-string.
        'permessage-deflate; server_max_window_bits="10"',
        'permessage-deflate; client_max_window_bits="12"',
        # An invalid value: the server MUST decline the offer (RFC 7692 7.1), not the socket.
        "permessage-deflate; server_max_window_bits=x",
    ],
)
def test_deflate_offer_with_quoted_or_invalid_parameter_gets_an_answer(
    deflate_api: Child, offer: str
) -> None:
    """With ORCHESTRATOR_WEBSOCKET_COMPRESSION on, a client's permessage-deflate offer must
    be accepted or declined in a 101 answer. The api instead drops the TCP connection without
    any HTTP response (and logs 'Exception in ASGI application')."""
    api = deflate_api
    tenant = unique("t")
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        head = (
            f"GET /ws/{tenant}/{unique('s')} HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: orchestrator.v1, bearer.{token(tenant)}\r\n"
            f"Sec-WebSocket-Extensions: {offer}\r\n\r\n"
        )
        sock.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    status = answer.split(b"\r\n", 1)[0]
    assert b" 101 " in status + b" ", (
        f"offer {offer!r}: the api answered {answer[:200]!r} (expected 101 Switching "
        "Protocols, with the extension accepted or declined)"
    )

"""What one socket may cost the api, whatever its client does (services/api/ws_protocol.py).

A client that never reads while it sends pings, a small compressed frame that inflates far
beyond the frame limit, and a client that stops reading mid-stream: each must leave the api's
memory and its socket counts bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import urllib.request
import zlib
from collections.abc import Iterator

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from bench.wsclient import OP_PING, OP_TEXT, client_frame
from services.api.ws_protocol import BoundedPerMessageDeflate
from services.cli.embedded import RedisServer
from services.cli.stack import Child
from services.core import keys
from tests.e2e.clients import events_until, final_of, send, token, unique
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, deploy, lone_api, proc_kb

PING_INTERVAL = 1.0
PING_TIMEOUT = 1.0
OP_CLOSE = 8


# A blocking raw-socket client: the test decides what is read and what is sent.


def open_raw(
    port: int, tenant: str, session: str, *, rcvbuf: int | None = None, extra: str = ""
) -> tuple[socket.socket, bytearray]:
    """Handshake by hand; return the socket and whatever came after the 101 head."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET /ws/{tenant}/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: orchestrator.v1, bearer.{token(tenant)}\r\n{extra}\r\n"
    )
    sock.sendall(head.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed during handshake: {data!r}")
        data += chunk
    status, _, rest = data.partition(b"\r\n\r\n")
    assert b" 101 " in status, status
    return sock, bytearray(rest)


def read_frame(sock: socket.socket, buffered: bytearray) -> tuple[int, bytes]:
    """One server frame (unmasked): opcode and payload."""
    first, payload = read_frame_head(sock, buffered)
    return first & 0x0F, payload


def read_frame_head(sock: socket.socket, buffered: bytearray) -> tuple[int, bytes]:
    """One server frame (unmasked): its first byte (FIN, RSV bits, opcode) and payload."""

    def need(n: int) -> None:
        while len(buffered) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buffered.extend(chunk)

    need(2)
    b0, length = buffered[0], buffered[1] & 0x7F
    start = 2
    if length == 126:
        need(4)
        length, start = int.from_bytes(buffered[2:4], "big"), 4
    elif length == 127:
        need(10)
        length, start = int.from_bytes(buffered[2:10], "big"), 10
    need(start + length)
    payload = bytes(buffered[start : start + length])
    del buffered[: start + length]
    return b0, payload


def read_json(sock: socket.socket, buffered: bytearray) -> dict:
    while True:
        op, payload = read_frame(sock, buffered)
        if op == OP_TEXT:
            return json.loads(payload)


# 1. Pings from a client that never reads.


def test_ping_flood_of_a_client_that_never_reads_does_not_grow_the_api(
    deployment: Deployment,
) -> None:
    """Control pings bypass the app's send queue: each is answered by a pong written into the
    transport. While the client does not take them the api must stop reading it (TCP
    backpressure), not buffer pongs for as long as the client sends."""
    api = deployment.api
    sock, buffered = open_raw(api.port, unique("t"), unique("s"), rcvbuf=4096)
    assert read_json(sock, buffered)["type"] == "connection.ack"
    before = proc_kb(api.process.pid, "VmRSS")
    batch = client_frame(OP_PING, b"p" * 125) * 2000  # 262 KB
    sent = 0
    sock.settimeout(2)  # a send blocked this long: the api stopped reading us
    try:
        while sent < 64 * 1024 * 1024:
            sock.sendall(batch)
            sent += len(batch)
    except OSError:
        pass
    grown_mb = (proc_kb(api.process.pid, "VmRSS") - before) / 1024
    sock.close()
    assert grown_mb < 16, (
        f"after {sent // 1024 // 1024} MB of pings from a client that reads nothing, the "
        f"api's RSS grew {grown_mb:.0f} MB (pongs queued without bound)"
    )
    assert sent < 64 * 1024 * 1024, "the api kept reading a client that takes no pong"


# 2. permessage-deflate: a small frame that inflates far beyond the frame limit.


@pytest.fixture(scope="module")
def compressing_api(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    logs = tmp_path_factory.mktemp("logs")
    with lone_api(e2e_redis, logs, websocket_compression="true") as child:
        yield child


def _compressed_text_frame(inflated: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = compressor.compress(b"a" * inflated) + compressor.flush(zlib.Z_SYNC_FLUSH)
    payload = payload.removesuffix(b"\x00\x00\xff\xff")
    n = len(payload)
    head = bytes((0x80 | 0x40 | 0x1,))  # FIN, RSV1 (compressed), text
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += bytes((0x80 | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((0x80 | 127,)) + struct.pack("!Q", n)
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def test_deflate_bomb_is_refused_before_it_is_inflated(compressing_api: Child) -> None:
    """uvicorn checks ws_max_size (twice MAX_FRAME_BYTES) only after wsproto inflated the
    frame with no output bound: a 64 KB frame would become 64 MB of bytes, then a str, then
    its UTF-8 copy. The api must close 1009 having inflated no more than the limit."""
    api = compressing_api
    frame = _compressed_text_frame(64 * 1024 * 1024)
    assert len(frame) < 128 * 1024
    sock, buffered = open_raw(
        api.port,
        unique("t"),
        unique("s"),
        extra="Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    assert read_frame(sock, buffered)[0] == OP_TEXT  # the ack (compressed)
    before = proc_kb(api.process.pid, "VmHWM")
    sock.sendall(frame)
    code = None
    try:
        while code is None:
            op, payload = read_frame(sock, buffered)
            if op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0]
    except (ConnectionError, TimeoutError):
        pass
    sock.close()
    grown_mb = (proc_kb(api.process.pid, "VmHWM") - before) / 1024
    assert grown_mb < 32, (
        f"a {len(frame) // 1024} KB compressed frame raised the api's peak RSS by "
        f"{grown_mb:.0f} MB (close code {code}); the frame limit is 256 KB"
    )
    assert code == CloseReason.MESSAGE_TOO_BIG


def _server_receiving(limit: int, inflated: int) -> list[object]:
    """The events a server with the bounded extension gets for one compressed message."""
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(
        client.send(Request(host="h", target="/", extensions=[PerMessageDeflate()]))
    )
    assert isinstance(next(server.events()), Request)
    client.receive_data(server.send(AcceptConnection(extensions=[BoundedPerMessageDeflate(limit)])))
    assert isinstance(next(client.events()), AcceptConnection)
    server.receive_data(client.send(TextMessage(data="a" * inflated)))
    return list(server.events())


def test_bounded_deflate_takes_a_message_up_to_its_limit_and_refuses_one_byte_more() -> None:
    """The bound is on the whole message, inclusive: compression changes no size limit."""
    taken = _server_receiving(100_000, 100_000)
    assert "".join(e.data for e in taken if isinstance(e, TextMessage)) == "a" * 100_000
    refused = _server_receiving(100_000, 100_001)
    assert [type(e) for e in refused] == [CloseConnection]
    assert refused[0].code == CloseReason.MESSAGE_TOO_BIG  # type: ignore[attr-defined]


# 3. A client that stops reading mid-stream, below the send queue's bounds (no 1008).


@pytest.fixture(scope="module")
def keepalive_deployment(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    with deploy(
        e2e_redis,
        tmp_path_factory.mktemp("logs"),
        websocket_ping_interval=str(PING_INTERVAL),
        websocket_ping_timeout=str(PING_TIMEOUT),
        **FAST_EXECUTOR,
    ) as deployed:
        yield deployed


def _open_sockets_gauge(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("orchestrator_websocket_connections "):
                return float(line.split()[1])
    raise AssertionError("no gauge")


async def _stream_long_answer(api: Child, tenant: str, session: str) -> None:
    """A 3.6 MB streamed answer (below the send queue's 4 MB / 1000 frames), waited for on
    a socket that reads."""
    reader = await websockets.connect(
        f"{api.ws_url}/ws/{tenant}/{session}",
        subprotocols=["orchestrator.v1", f"bearer.{token(tenant)}"],  # type: ignore[list-item]
        max_size=None,
    )
    async with httpx.AsyncClient() as http:
        reply = await send(
            http,
            api.url,
            tenant,
            {
                "message": "w" * 30_000,  # one word: one 30 KB chunk per repeat
                "session_id": session,
                "stream": True,
                "context": {"simulate": {"repeat": 60}},
            },
        )
    assert reply.status_code == 202, reply.text
    await events_until(reader, final_of(reply.json()["task_id"]), timeout=30)
    await reader.close()


async def test_socket_that_stops_reading_is_closed_and_uncounted(
    keepalive_deployment: Deployment,
) -> None:
    """uvicorn's keepalive timeout *closes* the transport, which waits to flush what the
    client never reads: without an abort `connection_lost` never comes, and the socket stays
    in orchestrator_websocket_connections and the tenant's socket count for ever."""
    deployment = keepalive_deployment
    api = deployment.api
    tenant, session = unique("zt"), unique("zs")
    redis = Redis.from_url(deployment.stack.env["ORCHESTRATOR_REDIS_URL"])
    loop = asyncio.get_running_loop()
    sock, buffered = await loop.run_in_executor(
        None, lambda: open_raw(api.port, tenant, session, rcvbuf=4096)
    )
    ack = await loop.run_in_executor(None, read_json, sock, buffered)
    assert ack["type"] == "connection.ack"
    try:
        await _stream_long_answer(api, tenant, session)  # the raw socket reads nothing more
        # Ping after 1 s, no pong 1 s later: the abort follows at once. 20 s is ample.
        async with asyncio.timeout(20):
            while _open_sockets_gauge(api.metrics_port) or await redis.zcard(
                keys.tenant_sockets(tenant)
            ):
                await asyncio.sleep(0.25)  # a metric and a Redis count: nothing to await
    except TimeoutError:
        pytest.fail(
            "20 s after the keepalive timed out, the socket of a client that stopped reading "
            f"is still open: orchestrator_websocket_connections="
            f"{_open_sockets_gauge(api.metrics_port):.0f}, tenant sockets="
            f"{await redis.zcard(keys.tenant_sockets(tenant))} (expected 0 and 0)"
        )
    finally:
        sock.close()
        await redis.aclose()

"""What a client with no token can make a real api process hold through httptools
(services/api/http_protocol.py): a request head of any shape is bounded in size, a request
body that stops coming is bounded in time; neither bound touches legitimate traffic (a body in
the same read as its head, pipelined requests, a slow but steady upload, an idle WebSocket)."""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator

import pytest

from bench.wsclient import OP_CLOSE, OP_PING, OP_PONG, client_frame
from services.cli.embedded import RedisServer
from services.cli.stack import Child
from tests.e2e.clients import token
from tests.e2e.conftest import e2e_redis, lone_api, proc_kb  # noqa: F401

pytestmark = pytest.mark.e2e

HEAD_TIMEOUT = 2.0
MAX_HEAD = 32 * 1024


@pytest.fixture(scope="module")
def api(e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:  # noqa: F811
    with lone_api(
        e2e_redis,
        tmp_path_factory.mktemp("logs"),
        http_head_timeout_seconds=str(HEAD_TIMEOUT),
        http_max_head_bytes=str(MAX_HEAD),
    ) as child:
        yield child


def connect(api: Child) -> socket.socket:
    return socket.create_connection(("127.0.0.1", api.port), timeout=10)


def answer_within(sock: socket.socket, wait: float) -> bytes | None:
    """What the api said within `wait` seconds: its answer, b"" (closed), None (nothing)."""
    sock.settimeout(wait)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None
    except OSError:
        return b""


def read_answers(sock: socket.socket, count: int) -> list[bytes]:
    """The status lines of the next `count` answers (bodies skipped by Content-Length)."""
    data, lines = b"", []
    while len(lines) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {lines}: {data[:200]!r}"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        lines.append(head.split(b"\r\n")[0])
        length = next(
            (
                int(h.split(b":")[1])
                for h in head.lower().split(b"\r\n")
                if h.startswith(b"content-length:")
            ),
            0,
        )
        while len(data) < length:
            data += sock.recv(65536)
        data = data[length:]
    return lines


def read_frame(sock: socket.socket, buffered: bytearray) -> tuple[int, bytes]:
    """One server frame (unmasked, under 64 KB: all this test expects)."""

    def need(size: int) -> None:
        while len(buffered) < size:
            chunk = sock.recv(65536)
            assert chunk, "closed"
            buffered.extend(chunk)

    need(2)
    size, start = buffered[1] & 0x7F, 2
    if size == 126:
        need(4)
        size, start = int.from_bytes(buffered[2:4], "big"), 4
    need(start + size)
    opcode, payload = buffered[0] & 0x0F, bytes(buffered[start : start + size])
    del buffered[: start + size]
    return opcode, payload


def padded_head(total: int, method: bytes = b"GET", extra: bytes = b"") -> bytes:
    """A complete head for /health of exactly `total` bytes, `extra` its last header lines."""
    start, end = method + b" /health HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n" + extra + b"\r\n"
    return start + b"a" * (total - len(start) - len(end)) + end


def test_one_endless_header_value_is_refused_at_the_head_limit(api: Child) -> None:
    """httptools keeps a header value whole and calls `on_header` only when it ends: counting
    there, the api took 48 MB (and more) of one value from an unauthenticated client."""
    before = proc_kb(api.process.pid)
    sent = 0
    with connect(api) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sock.settimeout(5)
        try:
            while sent < 48 * 2**20:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass  # refused and closed
    grown_mb = (proc_kb(api.process.pid) - before) / 1024
    assert sent < 8 * 2**20, f"the api took {sent // 2**20} MB of one header value"
    assert grown_mb < 8, f"the api grew by {grown_mb:.0f} MB"


def test_an_unfinished_head_of_the_limit_s_size_gets_a_400(api: Child) -> None:
    """Exactly MAX_HEAD bytes and no end yet: over the limit whatever follows, refused with
    400 at once (all of it read, so the answer is not lost to a reset)."""
    start = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
    with connect(api) as sock:
        sock.sendall(start + b"a" * (MAX_HEAD - len(start)))
        answer = answer_within(sock, HEAD_TIMEOUT / 2)
    assert answer is not None
    assert answer.startswith(b"HTTP/1.1 400"), answer


def test_a_head_of_exactly_the_limit_then_a_large_body_in_the_same_write_is_served(
    api: Child,
) -> None:
    """The bytes after a head's end, in the same read, are body, not head."""
    body = b"{" * 200_000
    head = padded_head(MAX_HEAD, b"PUT", b"Content-Length: %d\r\n" % len(body))
    assert len(head) == MAX_HEAD
    with connect(api) as sock:
        sock.sendall(head + body + padded_head(MAX_HEAD))
        status = read_answers(sock, 2)
    assert not status[0].startswith(b"HTTP/1.1 400"), status
    assert status[1] == b"HTTP/1.1 200 OK", status


def test_pipelined_heads_each_get_the_whole_limit(api: Child) -> None:
    """Two heads of 3/4 of the limit in one write: each is counted on its own."""
    one = padded_head(MAX_HEAD * 3 // 4)
    with connect(api) as sock:
        sock.sendall(one + one + one)
        assert read_answers(sock, 3) == [b"HTTP/1.1 200 OK"] * 3


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_unauthenticated_body_that_never_ends_is_not_held_open(api: Child, framing: str) -> None:
    """The head timer stopped at the end of the head: a POST with no token whose body never
    ends was neither answered 401 nor closed; the api waited on its body for ever (Litestar
    reads the body before it resolves the `principal` dependency)."""
    head = b"POST /api/chat/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if framing == "chunked":
        head += b"Transfer-Encoding: chunked\r\n\r\n" + b"1\r\n{\r\n"
    else:
        head += b"Content-Length: 200000\r\n\r\n{"
    with connect(api) as sock:
        sock.sendall(head)
        start = time.monotonic()
        answer = answer_within(sock, 3 * HEAD_TIMEOUT)
        waited = time.monotonic() - start
    assert answer is not None, f"no answer and no close in {waited:.1f}s"
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert waited >= HEAD_TIMEOUT * 0.9, f"cut after {waited:.1f}s"


def test_a_slow_but_steady_body_is_not_cut(api: Child) -> None:
    """A body whose bytes keep coming, each within the timeout, for longer than the timeout
    in all (the pauses are the point of the test: there is no event to await)."""
    body = b'{"tenant_id": "t", "session_id": "s", "text": "' + b"x" * 20 + b'"}'
    head = (
        b"POST /api/chat/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    pieces = [body[i : i + 5] for i in range(0, len(body), 5)]
    gap = 2.5 * HEAD_TIMEOUT / len(pieces)
    assert gap < HEAD_TIMEOUT / 3
    with connect(api) as sock:
        sock.sendall(head)
        for piece in pieces:
            time.sleep(gap)
            sock.sendall(piece)
        answer = answer_within(sock, 5)
    assert answer is not None
    assert answer.startswith(b"HTTP/1.1 401"), answer


def test_an_idle_websocket_is_not_closed_by_the_bounds(api: Child) -> None:
    """An upgrade has no body: the socket stays open, silent, beyond the timeout."""
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (
        f"GET /ws/bounds-tenant/bounds-session HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: orchestrator.v1, bearer.{token('bounds-tenant')}\r\n\r\n"
    )
    with connect(api) as sock:
        sock.sendall(handshake.encode())
        switched = b""
        while b"\r\n\r\n" not in switched:
            switched += sock.recv(65536)
        status, _, rest = switched.partition(b"\r\n\r\n")
        assert b" 101 " in status, status
        time.sleep(2 * HEAD_TIMEOUT)  # silence is the point: there is no event to await
        sock.settimeout(5)
        sock.sendall(client_frame(OP_PING, b"still here"))
        buffered, opcodes = bytearray(rest), []
        while (frame := read_frame(sock, buffered))[0] != OP_PONG:
            opcodes.append(frame[0])
    assert OP_CLOSE not in opcodes
    assert frame[1] == b"still here"


@pytest.mark.parametrize(("count", "status"), [(100, b" 200 "), (101, b" 400 ")])
def test_a_head_of_more_header_fields_than_apache_allows_is_refused(
    api: Child, count: int, status: bytes
) -> None:
    """65 000 one-byte headers fit in the head's bytes and cost ~8 MB of Python objects per
    request: at most 100 fields (Apache's LimitRequestFields), within a head of any size."""
    fields = b"".join(b"a%d: b\r\n" % n for n in range(count - 1))
    with connect(api) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        (line,) = read_answers(sock, 1)
    assert status in line, line


def test_an_idle_keep_alive_connection_outlives_the_proxies_reuse_of_it(api: Child) -> None:
    """A proxy in front (ingress-nginx keeps upstream connections 60 s, cloud load balancers
    60 s) writes its next request onto an idle connection it believes open: uvicorn closed
    them after 5 s, and a POST caught by that close is a 502 the proxy does not retry."""
    sock = connect(api)
    try:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request)
        assert read_answers(sock, 1) == [b"HTTP/1.1 200 OK"]
        assert answer_within(sock, 6.0) is None  # idle past uvicorn's default: still open
        sock.sendall(request)
        assert read_answers(sock, 1) == [b"HTTP/1.1 200 OK"]
    finally:
        sock.close()

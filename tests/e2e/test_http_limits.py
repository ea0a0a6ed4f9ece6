"""What a client with no token can make an api process hold: a request head is bounded in
size and in time (services/api/http_protocol.py), and the unauthenticated internal port
follows the api's address and refuses browsers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.stack import Child
from tests.e2e.conftest import lone_api, proc_kb

pytestmark = pytest.mark.e2e

HEAD_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def api(e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    with lone_api(
        e2e_redis,
        tmp_path_factory.mktemp("logs"),
        http_head_timeout_seconds=str(HEAD_TIMEOUT),
        http_max_head_bytes=str(16 * 1024),
    ) as child:
        yield child


async def read_until_closed(reader: asyncio.StreamReader, within: float) -> bytes | None:
    """What the server sent before closing; None if it still held the connection open."""
    received = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return received


async def test_a_request_head_over_the_limit_is_refused_with_400(api: Child) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n")
        await writer.drain()
        answer = await read_until_closed(reader, within=5)
    finally:
        writer.close()
    assert answer is not None
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


async def test_an_endless_header_block_is_cut_off_not_kept_in_memory(api: Child) -> None:
    """httptools kept every header byte for as long as they came: 32 MB of one endless header
    block grew the api by 32 MB, from a client with no token."""
    before = proc_kb(api.process.pid)
    _, writer = await asyncio.open_connection("127.0.0.1", api.port)
    line = b"X-Pad: " + b"a" * 65_000 + b"\r\n"
    sent = 0
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for _ in range(512):  # up to 32 MB, never finished
            writer.write(line)
            await writer.drain()
            sent += len(line)
    except ConnectionError:
        pass  # the server closed it
    finally:
        writer.close()
    grown_mb = (proc_kb(api.process.pid) - before) / 1024
    assert sent < 32 * 2**20, "the api took 32 MB of headers without closing the connection"
    assert grown_mb < 8, f"the api grew by {grown_mb:.0f} MB"


async def test_an_unfinished_request_head_is_closed_after_the_head_timeout(api: Child) -> None:
    """Slow loris without a token: half a socket handshake, then nothing. Nothing closed it,
    so one client could hold any number of connections."""
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    try:
        writer.write(b"GET /ws/t/s HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await writer.drain()
        answer = await read_until_closed(reader, within=HEAD_TIMEOUT * 5)
    finally:
        writer.close()
    assert answer is not None, "an unfinished request head was still open"


async def test_a_connection_that_sends_nothing_is_closed_too(api: Child) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    try:
        answer = await read_until_closed(reader, within=HEAD_TIMEOUT * 5)
    finally:
        writer.close()
    assert answer == b""


def _listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses something listens on at `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


async def test_the_internal_port_listens_where_the_api_does_and_refuses_browsers(
    api: Child,
) -> None:
    """`/drain` needs no token (the kubelet's preStop calls it). It listened on 0.0.0.0 even
    for an api bound to loopback (`orchestrator dev`): anyone who could reach the machine, or
    any web page through a GET, could drain it for good. Then it refused requests with
    `Origin` or `Sec-Fetch-*`, but Chromium sends neither with an <img> aimed at a plain-http
    address (a pod's): only a request with the preStop's header drains now."""
    assert api.metrics_port is not None
    assert _listening_addresses(api.metrics_port) == {"127.0.0.1"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.metrics_port}") as http:
        as_image = {"Accept": "image/avif,image/webp,*/*", "Referer": "http://evil.example/"}
        for header in (
            as_image,  # what an <img> on a page sends to an http address
            {"X-Orchestrator-Drain": "1", "Origin": "https://evil.example"},
            {"X-Orchestrator-Drain": "1", "Sec-Fetch-Site": "cross-site"},
            # README: any Sec-Fetch-* (only Sec-Fetch-Site was looked at; rolling-update review)
            {"X-Orchestrator-Drain": "1", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"},
        ):
            refused = await http.get("/drain", headers=header)
            assert refused.status_code == 403, header
        assert (await http.get("/health")).status_code == 200
    async with httpx.AsyncClient(base_url=api.url) as http:
        assert (await http.get("/health/ready")).status_code == 200  # not drained

"""Redis answering but refusing writes: a read-only replica (a primary demoted mid-failover).
README: REST answers 503 `unavailable` ("Redis unreachable or refusing writes"); a socket that
cannot be admitted for want of Redis is closed with 1013 ("try again later ... Redis
unavailable")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import websockets
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.cli.embedded import RedisServer, free_port
from services.cli.stack import Child, LocalStack
from tests.e2e.clients import Event, next_event, token, unique
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e


class ReadOnly:
    """A Redis of the test's own that it can turn into a read-only replica and back."""

    def __init__(self, server: RedisServer, primary: RedisServer) -> None:
        self.server, self.primary = server, primary
        self.client = Redis.from_url(server.url)

    @asynccontextmanager
    async def episode(self) -> AsyncIterator[None]:
        """Read-only (a replica of an empty primary) until the block ends."""
        await self.client.replicaof("127.0.0.1", self.primary.port)
        try:
            async with asyncio.timeout(10):
                while (await self.client.info("replication")).get("master_link_status") != "up":
                    await asyncio.sleep(0.05)
            yield
        finally:
            await self.client.replicaof("NO", "ONE")


@pytest.fixture
def servers() -> Iterator[tuple[RedisServer, RedisServer]]:
    server = RedisServer(port=free_port()).start()
    primary = RedisServer(port=free_port()).start()
    yield server, primary
    server.cleanup()
    primary.cleanup()


@pytest.fixture
async def api(
    servers: tuple[RedisServer, RedisServer], tmp_path: Path
) -> AsyncIterator[tuple[Child, ReadOnly]]:
    server, primary = servers
    stack: LocalStack = new_stack(server, tmp_path / "logs")
    read_only = ReadOnly(server, primary)
    try:
        api = stack.start_api()
        stack.wait_ready(api)
        yield api, read_only
    finally:
        stack.stop()
        await read_only.client.aclose()


async def open_socket(api: Child, tenant: str) -> tuple[ClientConnection, Event | None, int | None]:
    """A socket of a new session: (socket, its first frame or None, the close code or None)."""
    ws = await websockets.connect(
        f"{api.ws_url}/ws/{tenant}/{unique('s')}",
        subprotocols=["orchestrator.v1", f"bearer.{token(tenant)}"],  # type: ignore[list-item]
        open_timeout=10,
    )
    try:
        return ws, await next_event(ws, timeout=10), None
    except ConnectionClosed as closed:
        return ws, None, closed.rcvd.code if closed.rcvd is not None else None


async def test_a_socket_opened_while_redis_is_read_only_is_closed_with_1013(
    api: tuple[Child, ReadOnly],
) -> None:
    child, read_only = api
    async with read_only.episode():
        try:
            _, first, code = await open_socket(child, unique("t"))
        except InvalidStatus as refused:
            pytest.fail(
                f"the handshake was answered HTTP {refused.response.status_code}, "
                "not a socket closed with 1013"
            )
    assert first is None, first
    assert code == 1013

"""The per-tenant socket registry (`{tn:T}:sockets`) on a pod that holds sockets of many small
tenants: the pod's periodic refresh must reach every tenant's set before its members expire,
whatever the number of tenants, or a tenant's open sockets stop counting against its
`maxConnections` (a limit that leaks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from services.cli.embedded import RedisServer, free_port
from services.cli.stack import Child
from services.core import keys
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import connect, next_event, token
from tests.e2e.conftest import new_stack
from tests.faults.conftest import FaultProxy

pytestmark = pytest.mark.e2e

TENANTS = 300
TTL_SECONDS = 3  # the smallest ORCHESTRATOR_CONNECTION_TTL_SECONDS: a refresh every second
LATENCY_MS = 10  # each way: a 20 ms round trip to Redis (a loaded or remote Redis)
WATCH_SECONDS = 8.0


@pytest.fixture
def proxied_api(tmp_path: Path) -> Iterator[tuple[RedisServer, FaultProxy, Child]]:
    """One api whose Redis is behind the fault proxy (latency on demand), no worker: only
    the handshake and the registry are under test."""
    server = RedisServer(port=free_port()).start()
    proxy = FaultProxy("127.0.0.1", server.port)
    stack = new_stack(server, tmp_path / "logs", connection_ttl_seconds=str(TTL_SECONDS))
    try:
        api = stack.start_api(redis_url=proxy.redis_url)
        stack.wait_ready(api)
        yield server, proxy, api
    finally:
        stack.stop()
        proxy.stop()
        server.cleanup()


async def _open(api: Child, tenants: list[str]) -> list[ClientConnection]:
    sockets: list[ClientConnection] = []
    for start in range(0, len(tenants), 50):
        batch = tenants[start : start + 50]
        opened = await asyncio.gather(*(connect(api.ws_url, t, "s") for t in batch))
        sockets += [ws for ws, _ in opened]
    return sockets


async def _admitted(api: Child, tenant: str) -> bool:
    """Whether a new socket of `tenant` gets its ack (False: refused, 1008 connection_limit)."""
    async with websockets.connect(
        f"{api.ws_url}/ws/{tenant}/other",
        subprotocols=["orchestrator.v1", f"bearer.{token(tenant)}"],  # type: ignore[list-item]
        open_timeout=10,
    ) as ws:
        try:
            event = await next_event(ws, timeout=10)
        except ConnectionClosed as closed:
            refusal = closed.rcvd
        else:
            return bool(event["type"] == "connection.ack")
    assert refusal is not None
    assert refusal.code == 1008, refusal
    return False


async def test_a_tenant_at_its_socket_limit_stays_at_it_on_a_pod_with_many_tenants(
    proxied_api: tuple[RedisServer, FaultProxy, Child],
) -> None:
    """`keep_sockets_counted` refreshed the pod's sockets one tenant at a time, one awaited
    round trip each: a pass cost tenants x round trip, and once that exceeded the ttl less the
    refresh interval, every tenant's sockets dropped out of its count for part of each pass.
    Here 300 one-socket tenants and a 20 ms round trip make a 6 s pass against a 3 s ttl; a
    tenant allowed one socket, whose one socket stays open, then got a second one. (At the
    defaults, 30 s ttl, a pod of 1 000 tenants gets there at 20 ms a round trip, which a busy
    event loop or a loaded Redis reaches; a pipelined pass costs one round trip.)"""
    server, proxy, api = proxied_api
    direct = Redis.from_url(server.url)
    try:
        victim = "victim"
        await QuotaStore(direct, load_settings()).set(victim, "free", {"maxConnections": 1})
        tenants = [f"small-{n:04d}" for n in range(TENANTS)]
        held = await _open(api, [victim, *tenants])
        assert not await _admitted(api, victim), "the limit holds before the latency"
        await proxy.command(f"latency {LATENCY_MS}")
        leaked: list[float] = []
        started = time.monotonic()
        while time.monotonic() - started < WATCH_SECONDS:
            now = await direct.time()
            now_ms = now[0] * 1000 + now[1] // 1000
            live = await direct.zcount(keys.tenant_sockets(victim), f"({now_ms}", "+inf")
            if live == 0:  # its socket is open, yet it no longer counts
                leaked.append(time.monotonic() - started)
                break
            await asyncio.sleep(0.1)
        second = await _admitted(api, victim) if leaked else False
        await proxy.command("latency 0")
        for ws in held:
            await ws.close()
    finally:
        await direct.aclose()
    assert not leaked, (
        f"the victim's open socket stopped counting {leaked[0]:.1f} s into the watch "
        f"(a second socket admitted: {second})"
    )

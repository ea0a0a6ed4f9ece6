"""A reset of every connection between the api and Redis at once (a proxy or load balancer
restarting, a failover of the network path)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from services.cli.embedded import RedisServer
from tests.e2e.clients import send, unique
from tests.e2e.conftest import new_stack
from tests.faults.conftest import FaultProxy

pytestmark = pytest.mark.e2e


async def test_rest_answers_503_not_500_when_every_redis_connection_is_reset(
    own_redis: RedisServer, redis_proxy: FaultProxy, tmp_path: Path
) -> None:
    """README: while Redis is unreachable REST answers 503 `unavailable`, and lost connections
    are retried (redis-py's Retry on ConnectionError). After a reset, a command on a pooled
    connection whose transport uvloop has already closed fails with RuntimeError('... the
    handler is closed'), which is neither retried nor mapped to 503: the client gets 500
    `internal_error` though Redis is healthy."""
    stack = new_stack(own_redis, tmp_path / "logs")
    try:
        api = stack.start_api(redis_url=redis_proxy.redis_url)
        stack.wait_ready(api)
        tenant = unique("t")
        async with httpx.AsyncClient(timeout=30) as http:
            # Several pooled connections in use, then idle in the pool.
            warm = [send(http, api.url, tenant, {"message": f"warm {n}"}) for n in range(8)]
            assert {r.status_code for r in await asyncio.gather(*warm)} == {202}
            statuses: list[int] = []
            texts: list[str] = []
            for round_ in range(3):
                assert await redis_proxy.command("reset") > 0
                await asyncio.sleep(0.2)  # the resets reach the api (its loop sees them)
                for n in range(4):
                    reply = await send(http, api.url, tenant, {"message": f"after {round_} {n}"})
                    statuses.append(reply.status_code)
                    texts.append(reply.text)
        assert 500 not in statuses, next(
            t for s, t in zip(statuses, texts, strict=True) if s == 500
        )
        assert set(statuses) <= {202, 503}, statuses
    finally:
        stack.stop()


async def test_a_socket_is_not_closed_1011_when_every_redis_connection_is_reset(
    own_redis: RedisServer, redis_proxy: FaultProxy, tmp_path: Path
) -> None:
    """README: sockets stay open while Redis is away and a send on one is refused with
    `chat.error` `unavailable`; 1011 is for internal errors. A `chat.send` frame handled right
    after a reset of the api's Redis connections meets the same RuntimeError and the socket is
    closed with 1011 `internal error` (sockets.py's catch-all)."""
    from websockets.exceptions import ConnectionClosed

    from tests.e2e.clients import connect, next_event

    stack = new_stack(own_redis, tmp_path / "logs")
    sockets: list[tuple[ClientConnection, dict[str, Any]]] = []
    try:
        api = stack.start_api(redis_url=redis_proxy.redis_url)
        stack.wait_ready(api)
        tenant = unique("t")
        for _ in range(4):
            sockets.append(await connect(api.ws_url, tenant, unique("s")))
        assert await redis_proxy.command("reset") > 0
        await asyncio.sleep(0.2)  # the resets reach the api (its loop sees them)
        outcomes: list[str] = []
        for ws, _ in sockets:
            await ws.send('{"type": "chat.send", "data": {"message": "after the reset"}}')
            try:
                while True:
                    event = await next_event(ws, timeout=15)
                    if event["type"] in ("chat.status", "chat.error"):
                        outcomes.append(f"{event['type']} {event['data'].get('code', '')}")
                        break
            except ConnectionClosed as closed:
                outcomes.append(f"closed {closed.rcvd.code if closed.rcvd else None}")
        assert not [o for o in outcomes if o.startswith("closed")], outcomes
    finally:
        for ws, _ in sockets:
            await ws.close()
        stack.stop()

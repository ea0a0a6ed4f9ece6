"""Socket frames against real processes: what a client gets when a frame cannot be served."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from services.cli.embedded import RedisServer
from tests.e2e.clients import connect, next_event, unique
from tests.e2e.conftest import Deployment

pytestmark = pytest.mark.e2e


@pytest.fixture
async def own_client(e2e_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(e2e_redis.url)
    yield client
    await client.aclose()


async def test_a_socket_send_while_redis_refuses_writes_gets_chat_error_and_stays_open(
    deployment: Deployment, own_client: Redis
) -> None:
    """README: Redis refusing writes is `unavailable` (503 on REST); a socket frame that
    cannot be served gets a `chat.error` and the socket stays open (close codes: 1011 is an
    internal error, 1013 Redis unavailable)."""
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    policy = str((await own_client.config_get("maxmemory-policy"))["maxmemory-policy"])
    await own_client.config_set("maxmemory-policy", "noeviction")
    await own_client.config_set("maxmemory", "1")
    try:
        await ws.send(json.dumps({"type": "chat.send", "data": {"message": "hi"}}))
        try:
            answer = await next_event(ws, timeout=10)
        except ConnectionClosed as closed:
            pytest.fail(
                f"socket closed with {closed.rcvd.code if closed.rcvd else None} "
                f"{closed.rcvd.reason if closed.rcvd else ''!r} instead of a chat.error"
            )
    finally:
        await own_client.config_set("maxmemory", "0")
        await own_client.config_set("maxmemory-policy", policy)
    assert answer["type"] == "chat.error", answer
    assert answer["data"]["code"] == "unavailable", answer
    await ws.send('{"type": "ping"}')
    assert (await next_event(ws, timeout=10))["type"] == "pong"
    await ws.close()

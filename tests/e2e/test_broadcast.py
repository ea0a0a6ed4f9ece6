"""Tenant broadcasts (`websocket.broadcast`) on real processes: every socket of the tenant, on
every pod, gets each one once and in order, carrying its own cursor as id."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from services.core import keys
from services.core.actions import ACTION_FIELD, WebsocketBroadcast, encode_action
from tests.e2e.clients import connect, events_until, next_event, unique

pytestmark = pytest.mark.e2e

COUNT = 40


async def test_a_tenant_broadcast_reaches_every_socket_on_every_pod_once_in_order(
    two_apis: tuple[LocalStack, Child, Child], e2e_redis: RedisServer
) -> None:
    _, a, b = two_apis
    tenant = unique("t")
    other_tenant = unique("t")
    sockets = [
        await connect(a.ws_url, tenant, unique("s")),
        await connect(b.ws_url, tenant, unique("s")),
        await connect(b.ws_url, tenant, unique("s")),
    ]
    bystander, _ = await connect(a.ws_url, other_tenant, unique("s"))
    redis = Redis.from_url(e2e_redis.url)
    try:
        session = unique("s")
        stream = keys.callback_stream(keys.partition_of(tenant, session, 8))
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(COUNT):
                action = WebsocketBroadcast(tenant_id=tenant, session_id=session, message={"n": n})
                pipe.xadd(stream, {ACTION_FIELD: encode_action(action)})
            await pipe.execute()
    finally:
        await redis.aclose()
    for ws, ack in sockets:
        got = await events_until(
            ws, lambda e: e["type"] == "message" and e["data"]["n"] == COUNT - 1
        )
        assert [e["data"]["n"] for e in got] == list(range(COUNT))
        assert {e["id"] for e in got} == {ack["id"]}, "a broadcast carries the socket's cursor"
        await ws.send('{"type": "ping"}')
        assert (await next_event(ws))["type"] == "pong", "nothing more"
        await ws.close()
    await bystander.send('{"type": "ping"}')
    assert (await next_event(bystander))["type"] == "pong", "another tenant gets none"
    await bystander.close()

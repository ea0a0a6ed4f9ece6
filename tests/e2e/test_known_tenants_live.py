"""ORCHESTRATOR_REQUIRE_KNOWN_TENANT on a live api: records created and removed by the
platform team admit and refuse the tenant within about a second, on REST and sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import pytest
import websockets
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.stack import Child
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import connect, next_event, unique
from tests.e2e.conftest import lone_api, redis_client
from tests.e2e.test_tenant_overrides_live import _status, post, until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(own_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    with lone_api(own_redis, tmp_path_factory.mktemp("logs"), require_known_tenant="true") as child:
        yield child


@pytest.fixture
async def store(own_redis: RedisServer) -> AsyncIterator[QuotaStore]:
    client: Redis = redis_client(own_redis)
    yield QuotaStore(client, load_settings())
    await client.aclose()


async def test_an_unregistered_tenant_is_refused_then_admitted_then_refused_again(
    api: Child, store: QuotaStore
) -> None:
    """Guard: unknown: REST 403 unknown_tenant and the socket closed 1008; `tenants set`:
    admitted within about a second; `tenants delete`: refused again within about a second."""
    tenant = unique("t")
    reply = await post(api, tenant, {"message": "hi"})
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "unknown_tenant"
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await connect(api.ws_url, tenant, unique("s"))
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    await store.set(tenant, "free")
    await until(lambda: _status(api, tenant, {"message": "hi"}, 202), "tenants set")
    ws, _ = await connect(api.ws_url, tenant, unique("s"))
    await store.delete(tenant)
    await until(lambda: _status(api, tenant, {"message": "hi"}, 403), "tenants delete")
    await ws.send(json.dumps({"type": "chat.send", "data": {"message": "hi", "request_id": "r"}}))
    event = await next_event(ws)
    while event["type"] not in ("chat.error", "chat.status"):
        event = await next_event(ws)
    assert event["type"] == "chat.error", event
    assert event["data"]["code"] == "unknown_tenant", event
    await ws.close()

"""What a client can make at will (many Idempotency-Keys, cancels of unknown tasks, erasures
of unknown sessions, sockets dropped without a close) leaves nothing in Redis beyond what
README says (README "Client API", "Tenancy", "Redis keys")."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child
from services.core import keys
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, connect, next_event, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, deploy, redis_client
from tests.e2e.keyspace import keyspace, mentioning, until

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    redis_server: RedisServer
    api: Child


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    server = RedisServer().start()
    postgres = PostgresServer(durable=False).start()
    try:
        asyncio.run(migrate(postgres.url()))
        with deploy(
            server, tmp_path_factory.mktemp("logs"), database_url=postgres.url(), **FAST_EXECUTOR
        ) as deployed:
            yield Stack(server, deployed.api)
    finally:
        postgres.cleanup()
        server.cleanup()


async def test_refused_sends_leave_no_idempotency_key(stack: Stack) -> None:
    """Guard. A client past its rate limit sending each retry under a new Idempotency-Key:
    the refused sends' reserved keys are deleted (`_send_in_steps`), so only the accepted
    sends keep one (24 h, README "Client API"), bounded by the rate limit."""
    redis = redis_client(stack.redis_server)
    tenant, session = unique("t"), unique("s")
    await QuotaStore(redis, load_settings()).set(tenant, "free")
    try:
        async with httpx.AsyncClient() as http:
            codes = [
                (
                    await send(
                        http, stack.api.url, tenant, {"message": "hi", "session_id": session},
                        **{"Idempotency-Key": unique("k")},
                    )
                ).status_code
                for _ in range(25)
            ]  # fmt: skip
        kept = mentioning(await keyspace(redis), f"{{tn:{tenant}}}:idem:")
    finally:
        await redis.aclose()
    assert codes.count(429) > 0, codes
    assert len(kept) == codes.count(202), (codes, sorted(kept))
    assert all(0 < k.ttl <= 86_400 for k in kept.values()), kept


async def test_unknown_tasks_and_sessions_make_no_key(stack: Stack) -> None:
    """Guard. Cancels (REST and socket) and status reads of made-up task ids, and DELETEs of
    made-up sessions, are refused and write nothing to Redis."""
    redis = redis_client(stack.redis_server)
    tenant, session = unique("t"), unique("s")
    try:
        async with httpx.AsyncClient() as http:
            ws, _ = await connect(stack.api.ws_url, tenant, session)
            for i in range(10):
                task_id = unique(f"nope{i}")
                cancel = await http.post(
                    f"{stack.api.url}/api/chat/cancel",
                    json={"task_id": task_id},
                    headers=auth(tenant),
                )
                assert cancel.status_code == 404, cancel.text
                status = await http.get(
                    f"{stack.api.url}/api/chat/tasks/{task_id}", headers=auth(tenant)
                )
                assert status.status_code == 404, status.text
                frame = {"type": "chat.cancel", "data": {"task_id": task_id, "request_id": "x"}}
                await ws.send(json.dumps(frame))
                refused = await next_event(ws)
                assert refused["type"] == "chat.error", refused
                erased = await http.delete(
                    f"{stack.api.url}/api/sessions/{unique('s')}", headers=auth(tenant)
                )
                assert erased.status_code == 404, erased.text
            await ws.close()
        await until(lambda: _no_sockets(redis, tenant), "the socket to be released", timeout=5)
        made = mentioning(await keyspace(redis), tenant, "nope")
    finally:
        await redis.aclose()
    assert not made, sorted(made)


async def _no_sockets(redis, tenant: str) -> bool:  # type: ignore[no-untyped-def]
    return not await redis.exists(keys.tenant_sockets(tenant))


async def test_sockets_dropped_without_a_close_stop_counting_at_once(stack: Stack) -> None:
    """Guard. Clients whose connections drop (no close frame: a phone losing the network)
    leave `{tn:T}:sockets` as soon as the api sees the connection gone, not only after
    CONNECTION_TTL_SECONDS: a tenant of the free tier (5 sockets) reconnecting 5 times is not
    locked out."""
    redis = redis_client(stack.redis_server)
    tenant = unique("t")
    await QuotaStore(redis, load_settings()).set(tenant, "free")
    try:
        for _ in range(3):
            held = [(await connect(stack.api.ws_url, tenant, unique("s")))[0] for _ in range(5)]
            assert await redis.zcard(keys.tenant_sockets(tenant)) == 5
            for ws in held:
                ws.transport.abort()
            await until(lambda: _no_sockets(redis, tenant), "dropped sockets to stop counting",
                        timeout=5)  # fmt: skip
    finally:
        await redis.aclose()

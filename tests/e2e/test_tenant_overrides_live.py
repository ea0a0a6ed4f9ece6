"""A platform team changes a tenant's limits while api processes serve it: each override
applies within about a second, and removing it goes back to the tier's defaults.

One real api (no worker: the actions stay in the AES streams, where the test reads them),
real Redis; writes go through `orchestrator tenants set` (the CLI) or `QuotaStore` (its module).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.stack import Child
from services.core import keys
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from services.core.usage import UsageCounter
from tests.e2e.clients import auth, connect, unique
from tests.e2e.conftest import lone_api, redis_client

pytestmark = pytest.mark.e2e

# README: "within about a second". Bounded at 10 s so that a loaded CI machine does not fail
# it: still far below the 300 s cache TTL that would apply without the announcement.
APPLY_WITHIN = 10.0


@pytest.fixture(scope="module")
def api(own_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    """Unknown tenants get the free tier (ORCHESTRATOR_DEFAULT_TIER); a long cache TTL, so only
    the announcement can make a change visible."""
    with lone_api(
        own_redis,
        tmp_path_factory.mktemp("logs"),
        default_tier="free",
        validation_cache_ttl="300",
    ) as child:
        yield child


@pytest.fixture
async def redis(own_redis: RedisServer) -> AsyncIterator[Redis]:
    client = redis_client(own_redis)
    yield client
    await client.aclose()


@pytest.fixture
def store(redis: Redis) -> QuotaStore:
    return QuotaStore(redis, load_settings(default_tier="free"))


async def post(api: Child, tenant: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        return await http.post("/api/chat/send", json=body, headers=auth(tenant))


async def until(
    check: Callable[[], Awaitable[bool]], what: str, within: float = APPLY_WITHIN
) -> float:
    """Poll `check` until true; the seconds it took (fails after `within`)."""
    start = time.monotonic()
    while not await check():
        elapsed = time.monotonic() - start
        assert elapsed < within, f"{what}: not applied within {within} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def cli(own_redis: RedisServer, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "tenants", *args,
        env={"PATH": os.environ.get("PATH", ""), "ORCHESTRATOR_REDIS_URL": own_redis.url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def action_of(redis: Redis, task_id: str) -> tuple[str, dict[str, Any]]:
    """The priority stream an accepted task's action was added to, and the action's fields."""
    for priority in keys.PRIORITIES:
        for _, fields in await redis.xrange(keys.aes_stream(priority), "-", "+"):
            text = {k.decode(): v.decode() for k, v in fields.items()}
            if task_id in json.dumps(text):
                return priority, text
    raise AssertionError(f"no action for {task_id}")


def deadline_seconds(fields: dict[str, str]) -> float:
    for value in fields.values():
        try:
            action = json.loads(value)
        except ValueError:
            continue
        if isinstance(action, dict) and "deadline" in action:
            created = datetime.fromisoformat(action["created_at"].replace("Z", "+00:00"))
            deadline = datetime.fromisoformat(action["deadline"].replace("Z", "+00:00"))
            return (deadline - created).total_seconds()
    raise AssertionError(f"no deadline in {fields}")


# --- each override, on and off -------------------------------------------------------------


async def test_max_message_chars_override_applies_live_and_its_removal_restores_the_tier(
    api: Child, own_redis: RedisServer
) -> None:
    """Free allows 2 000 characters; `--limit maxMessageChars=10` refuses an 11-character
    message within about a second (422 message_too_long naming the limit), and `set` without
    the override allows it again."""
    tenant = unique("t")
    assert (await cli(own_redis, "set", tenant, "--tier", "free"))[0] == 0
    body = {"message": "x" * 11}
    assert (await post(api, tenant, body)).status_code == 202  # cache warm
    assert (await cli(own_redis, "set", tenant, "--tier", "free", "--limit", "maxMessageChars=10"))[
        0
    ] == 0
    await until(lambda: _status(api, tenant, body, 422), "maxMessageChars=10")
    reply = await post(api, tenant, body)
    assert reply.json()["error"]["code"] == "message_too_long"
    assert reply.json()["error"]["details"] == {"limit": 10, "length": 11}
    assert (await cli(own_redis, "set", tenant, "--tier", "free"))[0] == 0
    await until(lambda: _status(api, tenant, body, 202), "removal of maxMessageChars")


async def _status(api: Child, tenant: str, body: dict[str, Any], status: int) -> bool:
    return (await post(api, tenant, body)).status_code == status


async def test_streaming_and_allowed_agents_overrides_apply_live_and_revert(
    api: Child, store: QuotaStore
) -> None:
    """streaming=false on pro refuses stream:true (403 streaming_not_allowed); allowedAgents
    [support] refuses agent `default` (403 agent_not_allowed); both gone, both allowed."""
    tenant = unique("t")
    await store.set(tenant, "pro")
    streamed = {"message": "hi", "stream": True}
    assert (await post(api, tenant, streamed)).status_code == 202
    await store.set(tenant, "pro", {"streaming": False}, allowed_agents=["support"])
    await until(lambda: _status(api, tenant, streamed, 403), "streaming=false")
    reply = await post(api, tenant, {"message": "hi", "agent_id": "default"})
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "agent_not_allowed"
    reply = await post(api, tenant, {"message": "hi", "stream": True, "agent_id": "support"})
    assert reply.json()["error"]["code"] == "streaming_not_allowed"
    await store.set(tenant, "pro")
    await until(lambda: _status(api, tenant, streamed, 202), "removal of streaming=false")


async def test_priority_and_task_timeout_overrides_apply_to_the_next_action(
    api: Child, redis: Redis, store: QuotaStore
) -> None:
    """pro is `normal` with 120 s; priority=high and taskTimeoutSeconds=7 put the next action
    on the high stream with a 7 s deadline; removing them goes back to normal and 120 s."""
    tenant = unique("t")
    await store.set(tenant, "pro")
    first = await post(api, tenant, {"message": "hi"})
    priority, fields = await action_of(redis, first.json()["task_id"])
    assert priority == "normal"
    assert deadline_seconds(fields) == pytest.approx(120, abs=1)
    await store.set(tenant, "pro", {"priority": "high", "taskTimeoutSeconds": 7})

    async def on_high() -> bool:
        reply = await post(api, tenant, {"message": "hi"})
        on, fields = await action_of(redis, reply.json()["task_id"])
        on_high.fields = fields  # type: ignore[attr-defined]
        return on == "high"

    await until(on_high, "priority=high")
    assert deadline_seconds(on_high.fields) == pytest.approx(7, abs=1)  # type: ignore[attr-defined]
    await store.set(tenant, "pro")

    async def on_normal() -> bool:
        reply = await post(api, tenant, {"message": "hi"})
        return (await action_of(redis, reply.json()["task_id"]))[0] == "normal"

    await until(on_normal, "removal of priority")


async def test_a_lowered_session_rate_refuses_with_429_and_its_headers(
    api: Child, store: QuotaStore
) -> None:
    """pro: 60 per session; lowered to 2 the third send of a session is refused with 429
    rate_limited, `details.scope` session, `RateLimit-Limit: 2`, `Retry-After`."""
    tenant, session = unique("t"), unique("s")
    await store.set(tenant, "pro")
    assert (
        await post(api, tenant, {"message": "warm", "session_id": unique("s")})
    ).status_code == 202
    await store.set(tenant, "pro", {"requestsPerMinutePerSession": 2})
    await asyncio.sleep(0)  # the announcement: awaited below by the refusal itself
    replies = []
    start = time.monotonic()
    while True:
        reply = await post(api, tenant, {"message": "hi", "session_id": session})
        replies.append(reply)
        if reply.status_code == 429:
            break
        assert time.monotonic() - start < APPLY_WITHIN + 1, [r.status_code for r in replies]
    assert len(replies) == 3, [r.status_code for r in replies]
    error = reply.json()["error"]
    assert error["code"] == "rate_limited"
    assert error["details"]["scope"] == "session"
    assert error["details"]["limit"] == 2
    assert reply.headers["RateLimit-Limit"] == "2"
    assert reply.headers["RateLimit-Remaining"] == "0"
    assert 0 < int(reply.headers["Retry-After"]) <= 30


async def test_a_lowered_max_connections_refuses_the_next_socket_and_removal_restores(
    api: Child, store: QuotaStore
) -> None:
    """maxConnections=1: with one socket open, a second is closed 1008 `connection_limit`;
    back on the tier (free: 5) it opens."""
    tenant = unique("t")
    await store.set(tenant, "free")
    first, _ = await connect(api.ws_url, tenant, unique("s"))
    await store.set(tenant, "free", {"maxConnections": 1})

    async def refused() -> bool:
        try:
            ws, _ = await connect(api.ws_url, tenant, unique("s"))
        except websockets.ConnectionClosed as exc:
            refused.reason = exc.rcvd  # type: ignore[attr-defined]
            return True
        await ws.close()
        return False

    await until(refused, "maxConnections=1", within=APPLY_WITHIN + 1)
    close = refused.reason  # type: ignore[attr-defined]
    assert close.code == 1008
    assert close.reason.startswith("connection_limit")
    await store.set(tenant, "free")

    async def opens() -> bool:
        try:
            ws, _ = await connect(api.ws_url, tenant, unique("s"))
        except websockets.ConnectionClosed:
            return False
        await ws.close()
        return True

    await until(opens, "removal of maxConnections", within=APPLY_WITHIN + 1)
    await first.close()


async def test_a_lowered_token_budget_refuses_with_the_budget_headers(
    api: Child, redis: Redis, store: QuotaStore
) -> None:
    """pro: 2 000 000 tokens a day; 50 used, lowered to 40: 429 token_budget_exhausted with
    `RateLimit-Limit: 40`, `RateLimit-Remaining: 0`; `unlimited` admits again."""
    tenant = unique("t")
    await store.set(tenant, "pro")
    assert (await post(api, tenant, {"message": "hi"})).status_code == 202
    await UsageCounter(redis).add(tenant, unique("task"), input_tokens=20, output_tokens=30)
    await store.set(tenant, "pro", {"tokensPerDay": 40})
    await until(lambda: _status(api, tenant, {"message": "hi"}, 429), "tokensPerDay=40")
    reply = await post(api, tenant, {"message": "hi"})
    assert reply.json()["error"]["code"] == "token_budget_exhausted"
    assert reply.headers["RateLimit-Limit"] == "40"
    assert reply.headers["RateLimit-Remaining"] == "0"
    assert int(reply.headers["Retry-After"]) == int(reply.headers["RateLimit-Reset"])
    await store.set(tenant, "pro", {"tokensPerDay": None})
    await until(lambda: _status(api, tenant, {"message": "hi"}, 202), "tokensPerDay=unlimited")


async def test_deleting_the_record_drops_the_tenant_to_the_default_tier_live(
    api: Child, own_redis: RedisServer, store: QuotaStore
) -> None:
    """`tenants delete` of a pro tenant: it falls back to ORCHESTRATOR_DEFAULT_TIER (free, no
    streaming) within about a second."""
    tenant = unique("t")
    streamed = {"message": "hi", "stream": True}
    assert (await post(api, tenant, streamed)).status_code == 403  # default tier: free
    await store.set(tenant, "pro")
    await until(lambda: _status(api, tenant, streamed, 202), "pro")
    code, out, _ = await cli(own_redis, "delete", tenant)
    assert code == 0
    assert json.loads(out) == {"tenantId": tenant, "deleted": True}
    await until(lambda: _status(api, tenant, streamed, 403), "delete")


async def test_a_raised_session_rate_admits_a_held_client_at_once(
    api: Child, store: QuotaStore
) -> None:
    """README: "A limit raised while a client is held applies at its new pace at once". A
    session held at 2 per minute, raised to 600 per minute (one every 0.1 s), is admitted
    again within about a second, not after the old limit's Retry-After."""
    tenant, session = unique("t"), unique("s")
    await store.set(tenant, "pro", {"requestsPerMinutePerSession": 2})
    statuses = [
        (await post(api, tenant, {"message": "hi", "session_id": session})).status_code
        for _ in range(3)
    ]
    assert statuses == [202, 202, 429]
    await store.set(tenant, "pro", {"requestsPerMinutePerSession": 600})
    body = {"message": "hi", "session_id": session}
    await until(lambda: _status(api, tenant, body, 202), "requestsPerMinutePerSession=600")


async def test_a_lowered_tenant_rate_refuses_across_sessions_with_scope_tenant(
    api: Child, store: QuotaStore
) -> None:
    """requestsPerMinutePerTenant=3 on pro: the fourth send, each from a new session, is
    refused 429 with `details.scope` tenant and `RateLimit-Limit: 3`."""
    tenant = unique("t")
    await store.set(tenant, "pro")
    assert (await post(api, tenant, {"message": "warm"})).status_code == 202
    await store.set(tenant, "pro", {"requestsPerMinutePerTenant": 3})

    async def refused() -> bool:
        reply = await post(api, tenant, {"message": "hi", "session_id": unique("s")})
        refused.reply = reply  # type: ignore[attr-defined]
        return reply.status_code == 429

    await until(refused, "requestsPerMinutePerTenant=3")
    reply = refused.reply  # type: ignore[attr-defined]
    assert reply.json()["error"]["details"]["scope"] == "tenant"
    assert reply.headers["RateLimit-Limit"] == "3"


async def test_an_override_applies_to_an_open_socket_without_reconnecting(
    api: Child, store: QuotaStore
) -> None:
    """A socket opened under pro: after `maxMessageChars=5`, its next 6-character chat.send
    gets `chat.error` message_too_long (with its request_id) within about a second, and the
    socket stays open."""
    tenant, session = unique("t"), unique("s")
    await store.set(tenant, "pro")
    ws, _ = await connect(api.ws_url, tenant, session)
    await store.set(tenant, "pro", {"maxMessageChars": 5})
    start = time.monotonic()
    n = 0
    while True:
        n += 1
        await ws.send(
            json.dumps({"type": "chat.send", "data": {"message": "sixsix", "request_id": f"r{n}"}})
        )
        event = json.loads(await asyncio.wait_for(ws.recv(), 10))
        while event["type"] not in ("chat.status", "chat.error"):
            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if event["type"] == "chat.error":
            break
        assert time.monotonic() - start < APPLY_WITHIN, "maxMessageChars=5 not applied"
        await asyncio.sleep(0.05)
    assert event["data"]["code"] == "message_too_long"
    assert event["data"]["request_id"] == f"r{n}"
    await ws.close()


async def test_a_tierquota_applied_by_the_operator_reaches_a_live_api_and_its_deletion_reverts(
    api: Child, redis: Redis
) -> None:
    """Guard: the operator's handlers (real Redis, no cluster) apply a TierQuota (pro,
    2 per session, streaming off); the live api holds the tenant to it within about a second;
    the timer's status.usage counts the accepted sends (not the refused one) and the open
    socket; deleting the resource drops the tenant to the default tier (free) as fast."""
    from datetime import UTC

    from services.operator.handlers import TierQuotaHandlers
    from tests.operator.conftest import Clock, make_reconciler
    from tests.operator.test_handlers_spec_and_claims import call, ready

    tenant, session = unique("t"), unique("s")
    handlers = TierQuotaHandlers(
        make_reconciler(redis, clock=Clock(datetime.now(UTC))), refresh_seconds=30.0
    )
    spec = {"tenantId": tenant, "tier": "pro",
            "limits": {"requestsPerMinutePerSession": 2, "streaming": False}}  # fmt: skip
    assert (
        await post(api, tenant, {"message": "hi", "session_id": unique("s")})
    ).status_code == 202
    patch = await call(handlers.apply, spec, name=tenant)
    assert ready(patch)["reason"] == "Applied"
    await until(lambda: _status(api, tenant, {"message": "x" * 2001}, 202), "tier pro")
    assert (await post(api, tenant, {"message": "hi", "stream": True})).status_code == 403
    statuses = [
        (await post(api, tenant, {"message": "hi", "session_id": session})).status_code
        for _ in range(3)
    ]
    assert statuses == [202, 202, 429]
    ws, _ = await connect(api.ws_url, tenant, unique("s"))
    usage = (await call(handlers.refresh, spec, name=tenant))["status"]["usage"]
    assert usage["connections"] == 1
    assert usage["requestsToday"] == 4, usage  # warm-up, x*2001 and the two in `session`
    await ws.close()
    await handlers.release(namespace="tenants", name=tenant, spec=spec, retry=0)
    await until(lambda: _status(api, tenant, {"message": "x" * 2001}, 422), "back to free")

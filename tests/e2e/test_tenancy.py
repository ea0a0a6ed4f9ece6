"""Tenancy on real processes: tier rules, rate limits, connection quotas, idempotency."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from services.core import keys
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import (
    auth,
    connect,
    enqueued,
    events_until,
    final_of,
    next_event,
    token,
    unique,
)
from tests.e2e.conftest import FAST_EXECUTOR, new_stack, redis_client, redis_env
from tests.e2e.test_log_volume import log_lines

pytestmark = pytest.mark.e2e


class Tenancy:
    def __init__(
        self,
        stack: LocalStack,
        apis: list[Child],
        redis: Redis,
        url: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.redis_url = url
        self.redis_env = env or {"ORCHESTRATOR_REDIS_URL": url}  # what points a command at it
        self.stack = stack
        self.apis = apis
        self.redis = redis
        self.store = QuotaStore(redis, load_settings(default_tier="free"))

    async def queued(self) -> int:
        return await enqueued(self.redis)


@pytest.fixture(scope="module")
def tenancy_stack(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, list[Child]]]:
    """Two api processes whose unknown tenants get the free tier; quick socket expiry."""
    stack = new_stack(
        e2e_redis,
        tmp_path_factory.mktemp("logs"),
        default_tier="free",
        connection_ttl_seconds="3",
        **FAST_EXECUTOR,
    )
    try:
        apis = [stack.start_api(), stack.start_api()]
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(*apis)
        yield stack, apis
    finally:
        stack.stop()


@pytest.fixture
async def tenancy(
    tenancy_stack: tuple[LocalStack, list[Child]], e2e_redis: RedisServer
) -> AsyncIterator[Tenancy]:
    redis = redis_client(e2e_redis)
    yield Tenancy(*tenancy_stack, redis, e2e_redis.url, redis_env(e2e_redis))
    await redis.aclose()


async def post(api: Child, tenant: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api.url) as http:
        return await http.post("/api/chat/send", json=body, headers={**auth(tenant), **headers})


@pytest.mark.parametrize(("tier", "per_session"), [("free", 10), ("pro", 60)])
async def test_the_request_after_the_session_limit_is_refused_across_api_processes(
    tenancy: Tenancy, tier: str, per_session: int
) -> None:
    """A limit of N per minute admits a burst of N; the next is refused. The bucket refills
    one request every 60/N seconds, so on a slow machine the burst may earn a few more."""
    tenant, session = unique("t"), unique("s")
    await tenancy.store.set(tenant, tier, {"requestsPerMinutePerTenant": 1000})
    started = time.monotonic()
    accepted = 0
    async with httpx.AsyncClient() as http:
        while True:
            api = tenancy.apis[accepted % 2]  # spread over both processes
            before = await tenancy.queued()
            reply = await http.post(
                f"{api.url}/api/chat/send",
                json={"message": f"m{accepted}", "session_id": session},
                headers=auth(tenant),
            )
            if reply.status_code != 202:
                break
            accepted += 1
            assert int(reply.headers["RateLimit-Remaining"]) >= per_session - accepted
            assert accepted <= 2 * per_session, "the limit never refused"
    refilled = int((time.monotonic() - started) * per_session / 60)
    assert per_session <= accepted <= per_session + refilled
    assert reply.status_code == 429
    body = reply.json()["error"]
    assert body["code"] == "rate_limited"
    assert body["details"]["scope"] == "session"
    assert reply.headers["RateLimit-Limit"] == str(per_session)
    assert reply.headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(reply.headers["Retry-After"]) <= -(-60 // per_session)
    assert int(reply.headers["RateLimit-Reset"]) >= 1
    assert await tenancy.queued() == before, "a refused send enqueues nothing"


async def test_a_refused_session_is_allowed_again_after_retry_after(tenancy: Tenancy) -> None:
    tenant, session = unique("t"), unique("s")
    await tenancy.store.set(tenant, "pro", {"requestsPerMinutePerSession": 30})
    body = {"message": "quick", "session_id": session}
    replies = await asyncio.gather(*(post(tenancy.apis[n % 2], tenant, body) for n in range(31)))
    assert sum(r.status_code == 202 for r in replies) >= 30
    refused = next((r for r in replies if r.status_code == 429), None)
    while refused is None:  # a slow machine refilled the bucket meanwhile: keep going
        reply = await post(tenancy.apis[0], tenant, body)
        refused = reply if reply.status_code == 429 else None
    await asyncio.sleep(int(refused.headers["Retry-After"]))  # the client's documented wait
    again = await post(tenancy.apis[0], tenant, body)
    assert again.status_code == 202


async def test_the_tenant_limit_holds_over_many_sessions(tenancy: Tenancy) -> None:
    tenant = unique("t")  # unknown: the free tier, 30 requests per minute per tenant
    started = time.monotonic()
    accepted = 0
    while True:
        reply = await post(
            tenancy.apis[accepted % 2], tenant, {"message": "x", "session_id": f"s{accepted}"}
        )
        if reply.status_code != 202:
            break
        accepted += 1
        assert accepted <= 60, "the tenant limit never refused"
    refilled = int((time.monotonic() - started) * 30 / 60)
    assert 30 <= accepted <= 30 + refilled
    assert reply.status_code == 429
    assert reply.json()["error"]["details"]["scope"] == "tenant"


@pytest.mark.parametrize(
    ("limits", "body", "status", "code"),
    [
        ({}, {"message": "x" * 2001}, 422, "message_too_long"),
        ({}, {"message": "hi", "stream": True}, 403, "streaming_not_allowed"),
        ({"agents": ["helper"]}, {"message": "hi", "agent_id": "other"}, 403, "agent_not_allowed"),
    ],
    ids=["too-long", "no-streaming", "agent"],
)
async def test_tier_rules_refuse_with_their_code_and_enqueue_nothing(
    tenancy: Tenancy, limits: dict[str, Any], body: dict[str, Any], status: int, code: str
) -> None:
    tenant = unique("t")
    await tenancy.store.set(tenant, "free", allowed_agents=limits.get("agents"))
    before = await tenancy.queued()
    reply = await post(tenancy.apis[0], tenant, body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["code"] == code
    assert await tenancy.queued() == before


async def test_a_tenant_over_its_token_budget_is_refused_until_midnight_utc(
    tenancy: Tenancy,
) -> None:
    tenant, session = unique("t"), unique("s")
    await tenancy.store.set(tenant, "free", {"tokensPerDay": 10})
    ws, _ = await connect(tenancy.apis[0].ws_url, tenant, session)
    first = await post(
        tenancy.apis[0], tenant, {"message": "spend all the tokens please", "session_id": session}
    )
    assert first.status_code == 202
    await events_until(ws, final_of(first.json()["task_id"]))
    usage: dict[bytes, bytes] = {}
    for _ in range(200):  # usage is counted by the worker right after the answer
        usage = await tenancy.redis.hgetall(
            keys.tenant_usage(tenant, time.strftime("%Y-%m-%d", time.gmtime()))
        )
        if int(usage.get(b"tokens", 0)) >= 10:
            break
        await asyncio.sleep(0.02)
    before = await tenancy.queued()
    refused = await post(tenancy.apis[1], tenant, {"message": "more", "session_id": session})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "token_budget_exhausted"
    assert 0 < int(refused.headers["Retry-After"]) <= 86_400
    assert await tenancy.queued() == before
    await ws.close()


async def test_a_quota_change_by_the_cli_applies_on_running_apis_within_two_seconds(
    tenancy: Tenancy,
) -> None:
    tenant = unique("t")
    await tenancy.store.set(tenant, "free")
    assert (
        await post(tenancy.apis[0], tenant, {"message": "hi", "stream": True})
    ).status_code == 403
    changed = time.monotonic()
    command = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "tenants", "set", tenant, "--tier", "pro",
        env={"PATH": os.environ.get("PATH", ""), **tenancy.redis_env},
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await command.wait() == 0
    while True:
        reply = await post(tenancy.apis[0], tenant, {"message": "hi", "stream": True})
        if reply.status_code == 202:
            break
        assert time.monotonic() - changed < 2, "the change did not apply within 2 s"
        await asyncio.sleep(0.05)


async def test_an_idempotent_send_returns_the_first_task_and_enqueues_once(
    tenancy: Tenancy,
) -> None:
    tenant = unique("t")
    before = await tenancy.queued()
    first = await post(tenancy.apis[0], tenant, {"message": "once"}, **{"Idempotency-Key": "k-1"})
    second = await post(tenancy.apis[1], tenant, {"message": "once"}, **{"Idempotency-Key": "k-1"})
    assert first.status_code == second.status_code == 202
    assert first.json()["task_id"] == second.json()["task_id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    # Where the limits stand, as on every accepted send; the replay took nothing from them.
    remaining = int(first.headers["RateLimit-Remaining"])
    assert second.headers["RateLimit-Limit"] == first.headers["RateLimit-Limit"]
    assert remaining <= int(second.headers["RateLimit-Remaining"]) <= remaining + 1
    assert await tenancy.queued() == before + 1
    other_tenant = await post(
        tenancy.apis[0], unique("t"), {"message": "once"}, **{"Idempotency-Key": "k-1"}
    )
    assert other_tenant.json()["task_id"] != first.json()["task_id"]


async def test_a_double_submit_at_the_session_limit_is_answered_with_the_first_task(
    tenancy: Tenancy,
) -> None:
    """The same send with one key on both apis at once, the session with one request left:
    the key was reserved after the limits, so the second request, finding no task under the
    key yet, was refused 429 by the limit the first had just taken the last of, for a message
    that was sent. Both are answered with the one task now."""
    outcomes = []
    for n in range(5):
        tenant, session = unique("t"), unique("s")
        await tenancy.store.set(tenant, "pro", {"requestsPerMinutePerSession": 2})
        warm = await post(tenancy.apis[0], tenant, {"message": "first", "session_id": session})
        assert warm.headers["RateLimit-Remaining"] == "1", warm.text
        body, key = {"message": f"pay invoice {n}", "session_id": session}, unique("key")
        replies = await asyncio.gather(
            *(post(api, tenant, body, **{"Idempotency-Key": key}) for api in tenancy.apis)
        )
        outcomes.append([(r.status_code, r.json().get("task_id")) for r in replies])
    assert all(code == 202 for pair in outcomes for code, _ in pair), outcomes
    assert all(len({task for _, task in pair}) == 1 for pair in outcomes), outcomes


async def test_a_rate_limited_socket_send_gets_chat_error_and_stays_open(
    tenancy: Tenancy,
) -> None:
    tenant, session = unique("t"), unique("s")
    await tenancy.store.set(tenant, "free", {"requestsPerMinutePerSession": 1})
    ws, _ = await connect(tenancy.apis[0].ws_url, tenant, session)
    await ws.send('{"type": "chat.send", "data": {"message": "one"}}')
    await events_until(ws, lambda e: e["type"] == "chat.status")
    await ws.send('{"type": "chat.send", "data": {"message": "two", "request_id": "r2"}}')
    error = await events_until(ws, lambda e: e["type"] == "chat.error")
    data = error[-1]["data"]
    assert data["code"] == "rate_limited"
    assert data["request_id"] == "r2"
    assert data["details"]["limit"] == 1
    assert data["details"]["retryAfter"] == 60
    await ws.send('{"type": "ping"}')
    assert (await events_until(ws, lambda e: e["type"] == "pong"))[-1]["type"] == "pong"
    await ws.close()


async def close_code(ws: Any) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        await next_event(ws)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


async def test_the_connection_quota_counts_across_pods_and_recovers_after_a_pod_dies(
    tenancy: Tenancy, e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tenant = unique("t")
    await tenancy.store.set(tenant, "free", {"maxConnections": 2})
    doomed = tenancy.stack.start_api()
    tenancy.stack.wait_ready(doomed)
    held = [
        (await connect(doomed.ws_url, tenant, unique("s")))[0],
        (await connect(tenancy.apis[0].ws_url, tenant, unique("s")))[0],
    ]
    url = f"{tenancy.apis[1].ws_url}/ws/{tenant}/{unique('s')}"
    async with websockets.connect(
        url, subprotocols=["orchestrator.v1", f"bearer.{token(tenant)}"]
    ) as third:  # type: ignore[list-item]
        assert await close_code(third) == 1008
        assert third.close_reason is not None
        assert third.close_reason.startswith("connection_limit")
    tenancy.stack.stop_child(doomed, signal.SIGKILL)  # its socket is never released
    deadline = time.monotonic() + 10
    while True:
        try:
            ws, _ = await connect(tenancy.apis[1].ws_url, tenant, unique("s"))
            break
        except (AssertionError, ConnectionClosed):
            assert time.monotonic() < deadline, "the dead pod's socket never expired"
            await asyncio.sleep(0.2)
    await ws.close()
    for socket in held:
        await socket.close()


async def test_tenant_a_cannot_see_or_touch_tenant_b(tenancy: Tenancy) -> None:
    owner, intruder = unique("t"), unique("t")
    session = unique("s")
    sent = await post(tenancy.apis[0], owner, {"message": "private", "session_id": session})
    task_id = sent.json()["task_id"]
    async with httpx.AsyncClient(base_url=tenancy.apis[1].url) as http:
        assert (
            await http.get(f"/api/chat/tasks/{task_id}", headers=auth(intruder))
        ).status_code == 404
        cancel = await http.post(
            "/api/chat/cancel", json={"task_id": task_id}, headers=auth(intruder)
        )
        assert cancel.status_code == 404
        stats = (await http.get("/ws/stats", headers=auth(intruder))).json()
        assert owner not in stats["tenants"]
    url = f"{tenancy.apis[0].ws_url}/ws/{owner}/{session}"
    async with websockets.connect(
        url, subprotocols=["orchestrator.v1", f"bearer.{token(intruder)}"]
    ) as ws:  # type: ignore[list-item]
        assert await close_code(ws) == 1008
    ws_intruder, _ = await connect(tenancy.apis[0].ws_url, intruder, session)
    await ws_intruder.send('{"type": "chat.cancel", "data": {"task_id": "' + task_id + '"}}')
    refused = await events_until(ws_intruder, lambda e: e["type"] == "chat.error")
    assert refused[-1]["data"]["code"] == "not_found"
    await ws_intruder.close()


async def test_socket_counting_survives_redis_refusing_a_refresh(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """README: a socket that stayed open while Redis lost its data counts again at its pod's
    next refresh. Here Redis is briefly a read-only replica (a failover seen through a
    standalone endpoint) and comes back empty. The refresh refused with READONLY (not an
    outage) ended the pod's refresh task: its sockets were never counted again, so the
    tenant's `maxConnections` stopped holding."""
    server = RedisServer().start()
    upstream = RedisServer().start()  # an empty primary to replicate from
    stack = new_stack(server, tmp_path_factory.mktemp("ro-logs"), connection_ttl_seconds="3")
    redis = redis_client(server)
    try:
        api = stack.start_api()
        stack.wait_ready(api)
        tenant = unique("t")
        store = QuotaStore(redis, load_settings(default_tier="free"))
        await store.set(tenant, "pro", {"maxConnections": 1})
        ws, _ = await connect(api.ws_url, tenant, "s1")
        counted = keys.tenant_sockets(tenant)
        assert await redis.zcard(counted) == 1
        host, port = upstream.url.rsplit("/", 1)[0].rsplit("//", 1)[1].rsplit(":", 1)
        watcher = Redis.from_url(server.url)
        try:
            async with watcher.monitor() as monitor:
                await redis.execute_command("REPLICAOF", host, port)
                try:
                    async with asyncio.timeout(6):  # the pod's next refresh (every ttl / 3)
                        while True:
                            command = (await monitor.next_command())["command"]
                            if command.startswith("EVALSHA") and "refresh" in command:
                                break
                    async with asyncio.timeout(6):  # ...refused; the data is then replaced
                        while (await redis.info("replication"))["master_link_status"] != "up":
                            await asyncio.sleep(0.05)
                finally:
                    await redis.execute_command("REPLICAOF", "NO", "ONE")
        finally:
            await watcher.aclose()
        assert await redis.zcard(counted) == 0  # lost, as after a restart without persistence
        await store.set(tenant, "pro", {"maxConnections": 1})
        deadline = time.monotonic() + 6
        while await redis.zcard(counted) == 0:
            assert time.monotonic() < deadline, "the open socket is never counted again"
            await asyncio.sleep(0.1)
        await ws.close()
    finally:
        await redis.aclose()
        stack.stop()
        server.cleanup()
        upstream.cleanup()


async def test_an_unreadable_quota_record_is_the_deployments_fault_not_the_clients(
    tenancy: Tenancy,
) -> None:
    """A tenant whose stored quota record cannot be read (edited by hand, damaged) had every
    send answered 422 `validation_error` and every socket refused 1008 (policy): the client
    was blamed for an operator's error and told not to retry. Now 503 `unavailable` and 1013
    (try again), and the api logs an error naming the tenant and the fix: once a minute, not
    once per refused request (a busy tenant's retries flooded the log)."""
    tenant = unique("broken")
    await tenancy.redis.set(keys.tenant_quota(tenant), b'{"tier": 3}')
    api = tenancy.apis[0]
    sent = await post(api, tenant, {"message": "hello"})
    retries = [await post(api, tenant, {"message": "hello"}) for _ in range(3)]
    assert {r.status_code for r in retries} == {503}
    with pytest.raises(ConnectionClosed) as closed:
        async with websockets.connect(
            f"{api.ws_url}/ws/{tenant}/s1",
            subprotocols=["orchestrator.v1", f"bearer.{token(tenant)}"],  # type: ignore[list-item]
        ) as ws:
            await next_event(ws)
    await tenancy.redis.delete(keys.tenant_quota(tenant))
    assert sent.status_code == 503, sent.text
    assert sent.json()["error"]["code"] == "unavailable", sent.text
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1013, closed.value.rcvd
    logged = [
        json.loads(line) for line in log_lines(api) if "quota record of" in line and tenant in line
    ]
    assert len(logged) == 1, logged  # five refusals (four sends and the socket), one line
    assert (logged[0]["level"], logged[0].get("tenant_id")) == ("ERROR", tenant), logged[0]

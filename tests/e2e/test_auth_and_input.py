"""Refusals: bad tokens and bad input get the documented error, and nothing is enqueued."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.cli.embedded import RedisServer
from services.core import keys
from services.core.auth import LEEWAY_SECONDS
from services.core.settings import load_settings
from tests.e2e.clients import auth, connect, enqueued, next_event, token, unique
from tests.e2e.conftest import Deployment, lone_api, new_stack

pytestmark = pytest.mark.e2e

FRAME_LIMIT = load_settings().max_frame_bytes  # ORCHESTRATOR_MAX_FRAME_BYTES's default


@pytest.fixture
async def queued(e2e_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(e2e_redis.url)
    yield client
    await client.aclose()


async def aes_length(redis: Redis) -> int:
    return await enqueued(redis)


def bad_tokens(tenant: str) -> dict[str, str]:
    return {
        "expired": token(tenant, ttl=-60),
        "wrong key": token(tenant, secret="not-the-server-secret-" + "y" * 20),
        "garbage": "not.a.jwt",
    }


async def test_rest_refuses_missing_expired_and_forged_tokens(
    deployment: Deployment, queued: Redis
) -> None:
    tenant = unique("t")
    before = await aes_length(queued)
    async with httpx.AsyncClient(base_url=deployment.api.url) as http:
        missing = await http.post("/api/chat/send", json={"message": "x"})
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "unauthorized"
        for name, bad in bad_tokens(tenant).items():
            reply = await http.post(
                "/api/chat/send",
                json={"message": "x"},
                headers={"Authorization": f"Bearer {bad}"},
            )
            assert reply.status_code == 401, name
            assert reply.json()["error"]["code"] == "unauthorized"
        other_tenant = await http.post(
            "/api/chat/send",
            json={"message": "x"},
            headers={**auth(tenant), "X-Tenant-ID": "someone-else"},
        )
        assert other_tenant.status_code == 403
        assert other_tenant.json()["error"]["code"] == "forbidden"
    assert await aes_length(queued) == before


async def close_code_of(url: str, subprotocols: list[str], origin: str | None = None) -> int:
    """Open a socket that the server refuses; the close code it sends."""
    async with websockets.connect(
        url,
        subprotocols=subprotocols,  # type: ignore[arg-type]
        origin=origin,  # type: ignore[arg-type]
    ) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


async def test_socket_refuses_bad_tokens_and_wrong_tenant_with_1008(
    deployment: Deployment,
) -> None:
    tenant, session = unique("t"), unique("s")
    url = f"{deployment.api.ws_url}/ws/{tenant}/{session}"
    assert await close_code_of(url, ["orchestrator.v1"]) == 1008
    for bad in bad_tokens(tenant).values():
        assert await close_code_of(url, ["orchestrator.v1", f"bearer.{bad}"]) == 1008
    foreign = token("another-tenant")
    assert await close_code_of(url, ["orchestrator.v1", f"bearer.{foreign}"]) == 1008
    assert await close_code_of(f"{url}?token={foreign}", []) == 1008
    invalid_ids = f"{deployment.api.ws_url}/ws/{tenant}/bad%20id"
    assert await close_code_of(invalid_ids, ["orchestrator.v1", f"bearer.{token(tenant)}"]) == 1008


@pytest.mark.parametrize(
    "last_event_id",
    ["yesterday", "1", "\u00b2-0", f"1-{2**64}", f"{2**64}-0"],
    ids=["word", "no sequence", "non-ascii digit", "sequence beyond 64 bits", "ms beyond 64 bits"],
)
async def test_socket_refuses_a_bad_last_event_id_with_1008(
    deployment: Deployment, queued: Redis, last_event_id: str
) -> None:
    """1008, not 1011: a client treats 1011 as "reconnect and resume", and would send the same
    id for ever. The log holds events around the id, so a bad id that got past the check
    would reach Redis's XRANGE (which refuses it)."""
    tenant, session = unique("t"), unique("s")
    log = keys.session_log(tenant, session)
    for entry_id in ("1-1", "2-1", str(2**64 - 1) + "-0"):
        await queued.xadd(log, {"e": '"type":"message","data":{}}'}, id=entry_id)
    url = f"{deployment.api.ws_url}/ws/{tenant}/{session}?last_event_id={quote(last_event_id)}"
    assert await close_code_of(url, ["orchestrator.v1", f"bearer.{token(tenant)}"]) == 1008


async def test_socket_accepts_token_in_query_and_selects_no_protocol(
    deployment: Deployment,
) -> None:
    tenant, session = unique("t"), unique("s")
    url = f"{deployment.api.ws_url}/ws/{tenant}/{session}?token={token(tenant)}"
    async with websockets.connect(url) as ws:
        assert ws.subprotocol is None
        ack = json.loads(await ws.recv())
        assert ack["type"] == "connection.ack"


async def test_socket_selects_only_the_protocol_never_the_token(deployment: Deployment) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    assert ws.subprotocol == "orchestrator.v1"
    await ws.close()


async def test_cross_site_origin_is_refused_before_the_handshake(deployment: Deployment) -> None:
    tenant, session = unique("t"), unique("s")
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(
            f"{deployment.api.ws_url}/ws/{tenant}/{session}",
            subprotocols=["orchestrator.v1", f"bearer.{token(tenant)}"],  # type: ignore[list-item]
            origin="https://evil.example",  # type: ignore[arg-type]
        )
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "malformed_json"),
        (b'{"message": "hi"', 400, "malformed_json"),  # truncated
        (b"   ", 400, "malformed_json"),  # blank
        (b'{"message": "caf\xe9"}', 400, "malformed_json"),  # latin-1, not UTF-8
        (b'{"message": "\xff"}', 400, "malformed_json"),
        (
            b'{"message": "hi", "context": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
            400,
            "malformed_json",
        ),
        (b'{"message": ""}', 422, "validation_error"),
        (b'{"message": "hi", "stram": true}', 422, "validation_error"),
        (b'{"message": "hi", "session_id": "has spaces"}', 422, "validation_error"),
        (b'{"message": "hi", "agent_id": "' + b"a" * 65 + b'"}', 422, "validation_error"),
        (b'{"message": 42}', 422, "validation_error"),
        (b'["message"]', 422, "validation_error"),
    ],
)
async def test_rest_bad_input_gets_the_documented_error(
    deployment: Deployment, queued: Redis, body: bytes, status: int, code: str
) -> None:
    tenant = unique("t")
    before = await aes_length(queued)
    async with httpx.AsyncClient(base_url=deployment.api.url) as http:
        reply = await http.post(
            "/api/chat/send",
            content=body,
            headers={**auth(tenant), "Content-Type": "application/json"},
        )
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["code"] == code
    assert await aes_length(queued) == before


async def test_redis_refusing_writes_is_a_503_to_retry_not_a_500(
    deployment: Deployment, queued: Redis
) -> None:
    """Redis out of memory under `noeviction` (or a read-only replica mid-failover) answers
    but refuses writes: the client is told to retry, as when Redis is unreachable."""
    tenant = unique("t")
    async with httpx.AsyncClient(base_url=deployment.api.url, headers=auth(tenant)) as http:
        first = await http.post("/api/chat/send", json={"message": "hi", "stream": True})
        assert first.status_code == 202
        policy = (await queued.config_get("maxmemory-policy"))["maxmemory-policy"]
        await queued.config_set("maxmemory-policy", "noeviction")
        await queued.config_set("maxmemory", "1")
        try:
            send = await http.post("/api/chat/send", json={"message": "hi"})
            cancel = await http.post("/api/chat/cancel", json={"task_id": first.json()["task_id"]})
        finally:
            await queued.config_set("maxmemory", "0")
            await queued.config_set("maxmemory-policy", policy)
    for reply in (send, cancel):
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] == "unavailable"
        assert "refuses writes" in reply.json()["error"]["message"]


async def test_rest_refuses_bad_ids_and_oversize_bodies(deployment: Deployment) -> None:
    tenant = unique("t")
    async with httpx.AsyncClient(base_url=deployment.api.url) as http:
        bad_path = await http.get("/api/chat/tasks/not%20an%20id", headers=auth(tenant))
        assert bad_path.status_code == 422
        assert bad_path.json()["error"]["code"] == "validation_error"
        bad_header = await http.post(
            "/api/chat/send",
            json={"message": "hi"},
            headers={**auth(tenant), "X-Session-ID": "x" * 65},
        )
        assert bad_header.status_code == 400
        too_big = await http.post(
            "/api/chat/send",
            json={"message": "x" * (load_settings().max_body_bytes + 1)},
            headers=auth(tenant),
        )
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "payload_too_large"
        unknown = await http.get("/api/chat/tasks/doesnotexist", headers=auth(tenant))
        assert unknown.status_code == 404


async def test_bad_frames_get_error_events_and_the_socket_stays_open(
    deployment: Deployment,
) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    expectations = [
        ("{oops", "error", "malformed_json"),
        ('{"type": "dance"}', "error", "unknown_type"),
        ('{"data": {}}', "error", "invalid_frame"),
        ('{"type": "chat.send", "data": {"message": ""}}', "chat.error", "validation_error"),
        ('{"type": "chat.send", "data": {"message": "x", "bogus": 1}}', "chat.error", None),
        ('{"type": "chat.cancel", "data": {"task_id": "nope"}}', "chat.error", "not_found"),
    ]
    for frame, kind, code in expectations:
        await ws.send(frame)
        event = await next_event(ws)
        assert event["type"] == kind, (frame, event)
        if code is not None:
            assert event["data"]["code"] == code
    # Beyond the limit in UTF-8 bytes (2 per character), within twice it: read, then refused.
    large = "é" * (FRAME_LIMIT // 2 + 1_000)
    await ws.send(json.dumps({"type": "ping", "data": {"x": large}}, ensure_ascii=False))
    assert (await next_event(ws))["data"]["code"] == "frame_too_large"
    depth = 5_000  # 10 KB, well under the frame limit, nested beyond the decoder's stack
    await ws.send('{"type": "ping", "data": {"a": ' + "[" * depth + "]" * depth + "}}")
    assert (await next_event(ws))["data"]["code"] == "malformed_json"
    await ws.send(b"\x00binary")
    assert (await next_event(ws))["data"]["code"] == "unsupported_frame"
    await ws.send('{"type": "ping"}')
    assert (await next_event(ws))["type"] == "pong"
    await ws.close()


async def test_a_frame_over_twice_the_limit_is_not_read_and_closes_with_1009(
    deployment: Deployment,
) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    await ws.send(json.dumps({"type": "ping", "data": {"x": "x" * (2 * FRAME_LIMIT + 1_000)}}))
    with pytest.raises(ConnectionClosed) as closed:
        await next_event(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


async def test_health_schema_and_metrics_endpoints(deployment: Deployment) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    async with httpx.AsyncClient(base_url=deployment.api.url) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        assert (await http.get("/health/ready")).status_code == 200
        detailed = (await http.get("/health/detailed")).json()
        assert detailed["components"]["redis"]["status"] == "up"
        assert detailed["components"]["workers"]["alive"] >= 1
        stats = (await http.get("/ws/stats", headers=auth(tenant))).json()
        assert stats["tenants"] == {tenant: 1}
        assert stats["connections"] >= 1
        schema = (await http.get("/schema/openapi.json")).json()
        assert "/api/chat/send" in schema["paths"]
        metrics = await http.get(f"http://127.0.0.1:{deployment.api.metrics_port}/metrics")
    assert "orchestrator_websocket_connections " in metrics.text
    await ws.close()


async def test_a_storm_of_handshakes_never_fills_a_pod_beyond_its_limit(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """20 sockets at once on a pod of 5: the pod-full check used to pass for every handshake
    still waiting on Redis (quota, tenant limit), so all of them got in."""
    stack = new_stack(e2e_redis, tmp_path_factory.mktemp("logs"), max_websocket_connections="5")
    try:
        api = stack.start_api()
        stack.wait_ready(api)
        tenant = unique("t")

        async def one(n: int) -> tuple[ClientConnection | None, int | None]:
            try:
                ws, _ = await connect(api.ws_url, tenant, f"s{n}")
            except ConnectionClosed as closed:
                return None, closed.rcvd.code if closed.rcvd else None
            return ws, None

        outcomes = await asyncio.gather(*(one(n) for n in range(20)))
        opened = [ws for ws, _ in outcomes if ws is not None]
        assert len(opened) == 5
        assert sorted(code for _, code in outcomes if code is not None) == [1013] * 15
        for ws in opened:
            await ws.close()
    finally:
        stack.stop()


async def test_a_socket_whose_token_expired_delivers_but_no_longer_acts(
    deployment: Deployment,
) -> None:
    """The token is checked at the handshake, but a socket outlives it: after the token's
    `exp` (plus the verifier's leeway) a `chat.send` or `chat.cancel` on it was still
    enqueued as its user. Now they get `chat.error` `unauthorized`; the socket stays open
    (what it subscribed to is still delivered) until the client reconnects with a new token."""
    tenant, session = unique("t"), unique("s")
    valid_for = 2.0  # issued already expired, but within the 10 s leeway for 2 s more
    short = token(tenant, ttl=-int(LEEWAY_SECONDS - valid_for))
    issued = time.time()
    ws, _ = await connect(deployment.api.ws_url, tenant, session, bearer=short)
    await asyncio.sleep(max(0.0, issued + valid_for + 1.0 - time.time()))  # the clock is the event
    for kind, data in (("chat.send", {"message": "after exp"}), ("chat.cancel", {"task_id": "x"})):
        await ws.send(json.dumps({"type": kind, "data": {**data, "request_id": kind}}))
        refused = await next_event(ws, timeout=10)
        assert refused["type"] == "chat.error", refused
        assert refused["data"]["code"] == "unauthorized", refused
        assert refused["data"]["request_id"] == kind
    await ws.send("not json")
    assert (await next_event(ws, timeout=10))["type"] == "error"  # still open
    await ws.close()


async def test_tokens_of_the_previous_secret_work_during_a_rotation(
    e2e_redis: RedisServer, tmp_path: Path
) -> None:
    """README "Client API": with `ORCHESTRATOR_JWT_PREVIOUS_SECRET` the tokens handed out
    before the secret changed keep working, over REST and on a socket; a third secret's not."""
    previous = "the-secret-before-rotation-" + "p" * 20
    tenant = unique("t")
    with lone_api(e2e_redis, tmp_path / "logs", jwt_previous_secret=previous) as api:
        old = token(tenant, secret=previous)
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            body = {"message": "signed before the rotation", "session_id": unique("s")}
            sent = await http.post(
                "/api/chat/send", json=body, headers={"Authorization": f"Bearer {old}"}
            )
            assert sent.status_code == 202, sent.text
            current = await http.get("/api/usage", headers=auth(tenant))
            assert current.status_code in (200, 503), current.text  # not 401: the new secret
            stranger = token(tenant, secret="a-third-secret-nobody-configured-" + "z" * 8)
            refused = await http.post(
                "/api/chat/send", json=body, headers={"Authorization": f"Bearer {stranger}"}
            )
            assert refused.status_code == 401, refused.text
        ws, ack = await connect(api.ws_url, tenant, unique("s"), bearer=old)
        await ws.close()
        assert ack["data"]["tenant_id"] == tenant

"""Unusual but valid JSON through every store: api -> Redis -> AES -> worker -> socket and
PostgreSQL history. The client gets its data back exactly, or a clear 4xx at the door, or (for
an AES answer that cannot be read) `chat.error` `malformed_answer` at once (README "For AES
teams": "its task fails at once ... instead of waiting for its deadline")."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child, LocalStack
from services.core.actions import encode_action, failure_for_unreadable
from services.core.keys import PRIORITIES, aes_stream
from services.persistence.migrate import migrate
from tests.e2e.clients import SECRET, auth, connect, events_until, final_of, next_event, unique
from tests.e2e.conftest import new_stack
from tests.e2e.external_aes import Aes
from tests.e2e.test_auth_and_input import close_code_of
from tests.e2e.test_external_aes import client_redis

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def unusual_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(durable=False).start()
    asyncio.run(migrate(server.url()))
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def stack(
    e2e_redis: RedisServer,
    unusual_postgres: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalStack, Child]]:
    """api + worker (+ its persistence writer), no executor: the test is the AES."""
    stack = new_stack(
        e2e_redis, tmp_path_factory.mktemp("unusual-logs"), database_url=unusual_postgres.url()
    )
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.wait_ready(api)
        yield stack, api
    finally:
        stack.stop()


async def post_send(api: Child, headers: dict[str, str], **body: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        return await http.post("/api/chat/send", json=body, headers=headers)


async def start_task(api: Child, tenant: str, session: str, **body: Any) -> str:
    reply = await post_send(
        api, auth(tenant), **{"message": "hello", "session_id": session, "stream": True, **body}
    )
    assert reply.status_code == 202, reply.text
    return str(reply.json()["task_id"])


async def history(
    api: Child, tenant: str, session: str, *, expect: int, timeout: float = 20
) -> list[dict[str, Any]]:
    """The session's messages once there are `expect` of them (the writer is asynchronous)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        while True:
            reply = await http.get(f"/api/sessions/{session}/messages", headers=auth(tenant))
            messages: list[dict[str, Any]] = (
                reply.json()["messages"] if reply.status_code == 200 else []
            )
            if len(messages) >= expect or time.monotonic() > deadline:
                return messages
            await asyncio.sleep(0.05)


# --- 1. an AES answer with a number beyond a double or a lone surrogate -------------------

UNREADABLE_ANSWERS = {
    # json.dumps writes float("inf") as Infinity; 1e400 is the valid-JSON spelling of it
    "cost_1e400": ('"cost": 0.5', '"cost": 1e400', "Number out of range"),
    # valid JSON text (RFC 8259 8.2 allows it), not valid Unicode
    "content_lone_surrogate": (
        '"content": "the answer"',
        '"content": "half \\ud83d"',
        "surrogate",
    ),
}


@pytest.mark.parametrize("swap", UNREADABLE_ANSWERS.values(), ids=UNREADABLE_ANSWERS.keys())
async def test_an_unreadable_completion_fails_its_task_at_once(
    stack: tuple[LocalStack, Child], swap: tuple[str, str, str]
) -> None:
    """README: "a completion or failure that still cannot be read is dead-lettered with the
    reason, and its task fails at once with `chat.error` `malformed_answer`". A completion
    whose usage says `1e400` (or whose content holds a lone surrogate) was dead-lettered, but
    the loose re-read that finds its task failed on the same number, so the client was told
    nothing until the task's deadline (300 s for the enterprise tier)."""
    st, api = stack
    redis = client_redis(st)
    aes = Aes(redis, "aes-unusual-unreadable")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    try:
        task_id = await start_task(api, tenant, session)
        stream, entry, action = await aes.take(task_id)
        body = {
            "tenant_id": action["tenant_id"],
            "session_id": action["session_id"],
            "task_id": action["task_id"],
            "attempt": action["attempt"],
            "action_type": "execution.completed",
            "content": "the answer",
            "usage": {"input_tokens": 1, "output_tokens": 2, "cost": 0.5},
        }
        raw = json.dumps(body)
        old, new, why = swap
        assert old in raw
        await redis.xadd(action["callback_queue"], {"action": raw.replace(old, new)})
        await aes.ack(stream, entry)
        final = (await events_until(ws, final_of(task_id), timeout=15))[-1]
        assert final["type"] == "chat.error", final
        assert final["data"]["code"] == "malformed_answer", final
        assert why in final["data"]["message"], final
    finally:
        await ws.close()
        await redis.aclose()


# --- 2. NUL: refused at the door; an AES's answer keeps U+FFFD in history -------------------


async def test_a_message_with_nul_is_refused_at_the_door(stack: tuple[LocalStack, Child]) -> None:
    """U+0000 is valid JSON (`\\u0000`), but PostgreSQL `text` cannot hold it: the api took
    the message (202), the socket showed it, and the history kept U+FFFD in its place. Now a
    422 `validation_error` that says why, and on the socket the `chat.error` of any invalid
    `chat.send` (the socket stays open and takes the next message)."""
    _, api = stack
    tenant, session = unique("t"), unique("s")
    reply = await post_send(api, auth(tenant), message="ask\u0000me", session_id=session)
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["code"] == "validation_error", error
    assert "U+0000" in error["message"], error
    ws, _ = await connect(api.ws_url, tenant, session)
    try:
        await ws.send(json.dumps({"type": "chat.send", "data": {"message": "ask\u0000me"}}))
        refused = await next_event(ws)
        assert refused["type"] == "chat.error", refused
        assert refused["data"]["code"] == "validation_error", refused
        assert "U+0000" in refused["data"]["message"], refused
        await ws.send(json.dumps({"type": "chat.send", "data": {"message": "ask me"}}))
        assert (await next_event(ws))["type"] == "chat.status"
    finally:
        await ws.close()


async def test_nul_in_an_answer_is_shown_and_kept_as_a_replacement_in_history(
    stack: tuple[LocalStack, Child],
) -> None:
    """An AES's answer is not refused for a NUL: the socket shows it as sent, and the history
    (PostgreSQL `text`) keeps U+FFFD in its place, as documented."""
    st, api = stack
    redis = client_redis(st)
    aes = Aes(redis, "aes-unusual-nul")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    try:
        task_id = await start_task(api, tenant, session, message="ask me")
        stream, entry, action = await aes.take(task_id)
        await aes.answer(action, {"action_type": "execution.completed", "content": "an\u0000swer"})
        await aes.ack(stream, entry)
        final = (await events_until(ws, final_of(task_id)))[-1]
        assert final["data"]["content"] == "an\u0000swer"
        messages = await history(api, tenant, session, expect=2)
        assert [m["content"] for m in messages] == ["ask me", "an\ufffdswer"]
    finally:
        await ws.close()
        await redis.aclose()


# --- 3. a signed token whose claims hold a lone surrogate ----------------------------------


def forged_token(tenant: str, **claims: Any) -> str:
    """Signed with the stack's secret; json.dumps writes a lone surrogate as `\\ud83d`, as
    JSON.stringify does."""
    body = {"sub": "user-1", "tenant_id": tenant, "exp": int(time.time()) + 600, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


CUT_NAME = "Ren\u00e9e \ud83d"  # a JavaScript auth server cut it at 7 UTF-16 units


async def test_a_name_cut_mid_pair_is_repaired_and_the_send_goes_through(
    stack: tuple[LocalStack, Child],
) -> None:
    """A JavaScript auth server that cuts a display name at n UTF-16 units signs a lone
    surrogate; PyJWT reads it with the stdlib json, which keeps it, and the send was a 500
    (nothing encodes it to UTF-8). The name is only shown: its lone surrogate becomes U+FFFD
    and the user's message goes through."""
    st, api = stack
    redis = client_redis(st)
    aes = Aes(redis, "aes-unusual-name")
    await aes.ensure_group()
    tenant = unique("t")
    headers = {"Authorization": f"Bearer {forged_token(tenant, name=CUT_NAME)}"}
    try:
        reply = await post_send(api, headers, message="hi", session_id=unique("s"))
        assert reply.status_code == 202, reply.text
        stream, entry, action = await aes.take(reply.json()["task_id"])
        await aes.ack(stream, entry)
        assert action["user"] == {"id": "user-1", "name": "Ren\u00e9e \ufffd"}
    finally:
        await redis.aclose()


@pytest.mark.parametrize("sub", ["user-\ud83d", "user-\x00"], ids=["lone surrogate", "NUL"])
async def test_a_sub_history_cannot_keep_apart_is_refused_with_401(
    stack: tuple[LocalStack, Child], sub: str
) -> None:
    """`sub` is who the user is: not repaired (two users' ids could become one), refused
    with the 401 of any invalid token, naming the claim; the socket's handshake too. A NUL
    was accepted: history stores it as U+FFFD (PostgreSQL text cannot hold it), so the
    users "a\x00b" and "a\ufffdb" shared one history identity, and `GET /api/sessions` listed
    one's conversations to the other."""
    _, api = stack
    tenant, session = unique("t"), unique("s")
    bad = forged_token(tenant, sub=sub)
    reply = await post_send(
        api, {"Authorization": f"Bearer {bad}"}, message="hi", session_id=session
    )
    assert reply.status_code == 401, reply.text
    assert "sub" in reply.json()["error"]["message"], reply.text
    url = f"{api.ws_url}/ws/{tenant}/{session}"
    assert await close_code_of(url, ["orchestrator.v1", f"bearer.{bad}"]) == 1008


async def test_a_socket_send_with_a_cut_name_keeps_the_socket(
    stack: tuple[LocalStack, Child],
) -> None:
    """The same token on a socket: the first `chat.send` closed it with 1011 internal error;
    now it is accepted like any other (`chat.status`)."""
    _, api = stack
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session, bearer=forged_token(tenant, name=CUT_NAME))
    try:
        await ws.send(json.dumps({"type": "chat.send", "data": {"message": "hi"}}))
        try:
            event = await next_event(ws, timeout=10)
        except ConnectionClosed as exc:
            pytest.fail(f"socket closed on a chat.send: {exc.rcvd}")
        assert event["type"] == "chat.status", event
    finally:
        await ws.close()


# --- 4. Idempotency-Key replay of a request with a deeply nested context -------------------


def nested_context(depth: int) -> bytes:
    return b'{"message": "deep", "context": {"d": ' + b"[" * depth + b"]" * depth + b"}}"


async def forget_actions(redis: Redis, tenant: str) -> None:
    """Delete the tenant's `chat.process` entries from the AES streams: too deep for the
    stdlib json of the test AES (`Aes.take`) that reads the streams after this test."""
    for priority in PRIORITIES:
        stream = aes_stream(priority)
        entries = await redis.xrange(stream)
        mine = [eid for eid, fields in entries if tenant.encode() in fields[b"action"][:400]]
        if mine:
            await redis.xdel(stream, *mine)


async def test_a_retried_send_with_a_deep_context_is_replayed_not_a_500(
    stack: tuple[LocalStack, Child],
) -> None:
    """A context the api accepted (202) is compared with the stored action on a retry with the
    same `Idempotency-Key`; the stored action was decoded again deeper in the stack (the
    recursion limit: a 500). The retry is answered like the first send (202,
    `Idempotent-Replayed`), for the deepest contexts a send accepts."""
    st, api = stack
    tenant = unique("t")
    redis = client_redis(st)
    try:
        outcomes, deepest = await retry_deep_sends(api, tenant)
    finally:
        await forget_actions(redis, tenant)
        await redis.aclose()
    assert deepest > 100, deepest
    assert not outcomes, f"deepest accepted {deepest}; retries not replayed: {outcomes}"


async def retry_deep_sends(api: Child, tenant: str) -> tuple[dict[int, Any], int]:
    """The deepest context a first send accepts, and how retries of the deepest ones were
    answered when not as replays of their first send."""
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:

        async def post(depth: int, key: str, session: str = "") -> httpx.Response:
            return await http.post(
                "/api/chat/send",
                content=nested_context(depth),
                headers={
                    **auth(tenant),
                    "Content-Type": "application/json",
                    "Idempotency-Key": key,
                    "X-Session-ID": session or unique("s"),
                },
            )

        lo, hi = 1, 1200  # the deepest context a first send accepts
        while lo < hi:
            mid = (lo + hi + 1) // 2
            reply = await post(mid, unique("k"))
            assert reply.status_code in (202, 400), (mid, reply.status_code, reply.text[:200])
            lo, hi = (mid, hi) if reply.status_code == 202 else (lo, mid - 1)
        outcomes: dict[int, Any] = {}
        accepted = 0
        for depth in range(lo, max(lo - 8, 1), -1):
            key, session = unique("k"), unique("s")
            first = await post(depth, key, session)
            if first.status_code == 400 and accepted == 0:
                # The limit sits a frame or two lower this time (a collection's finalizer,
                # a log line on the stack while the body is decoded): the next depth is
                # the deepest a send accepts now.
                continue
            assert first.status_code == 202, (depth, first.text[:200])
            accepted += 1
            again = await post(depth, key, session)
            if again.status_code != 202 or again.headers.get("Idempotent-Replayed") != "true":
                outcomes[depth] = (again.status_code, again.text[:120])
            elif again.json()["task_id"] != first.json()["task_id"]:
                outcomes[depth] = (again.status_code, "another task")
        assert accepted >= 3, f"the first sends of depths {lo} to {lo - 7} were refused"
    return outcomes, lo


# --- 5. usage figures of an AES: history must show what the socket showed ------------------


async def test_the_cost_in_history_is_the_cost_shown_on_the_socket(
    stack: tuple[LocalStack, Child],
) -> None:
    """An AES reports `cost` 0.0000000042 (a few tokens of a cheap model: the README bounds
    cost at 10^9 and says nothing of its precision). The socket's `chat.response` shows it,
    and the history must show the same (a writer that rounds to 9 places showed 4e-09)."""
    st, api = stack
    redis = client_redis(st)
    aes = Aes(redis, "aes-unusual-cost")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    try:
        task_id = await start_task(api, tenant, session)
        stream, entry, action = await aes.take(task_id)
        usage = {"input_tokens": 3, "output_tokens": 1, "cost": 4.2e-09, "model": "tiny"}
        await aes.answer(
            action, {"action_type": "execution.completed", "content": "ok", "usage": usage}
        )
        await aes.ack(stream, entry)
        final = (await events_until(ws, final_of(task_id)))[-1]
        assert final["data"]["usage"]["cost"] == 4.2e-09, final
        messages = await history(api, tenant, session, expect=2)
        assert messages[1]["usage"] == final["data"]["usage"], (
            f"history {messages[1]['usage']} != socket {final['data']['usage']}"
        )
    finally:
        await ws.close()
        await redis.aclose()


def test_the_failure_of_an_unreadable_answer_can_be_encoded() -> None:
    """The loose re-read keeps a lone surrogate in its strings: a trace context holding one
    is dropped from the failure (which is encoded again on its way to the socket), not
    carried into a second UnicodeEncodeError."""
    raw = json.dumps(
        {
            "action_type": "execution.completed",
            "tenant_id": "t1",
            "session_id": "s1",
            "task_id": "k1",
            "attempt": 2,
            "content": "half \ud83d",
            "usage": {"cost": 1.0},
            "trace_context": {"traceparent": "00-\ud83d", "tracestate": "a=b"},
        }
    ).replace("1.0", "1e400")
    failure = failure_for_unreadable(raw.encode(), "why")
    assert failure is not None
    assert (failure.task_id, failure.attempt, failure.code) == ("k1", 2, "malformed_answer")
    assert failure.trace_context == {"tracestate": "a=b"}
    encode_action(failure)

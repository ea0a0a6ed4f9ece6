"""An AES team's view of README's contract, written without our code (tests/e2e/external_aes.py)
against real api and worker processes, with no reference executor."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from tests.e2e.clients import auth, connect, events_until, final_of, unique
from tests.e2e.conftest import new_stack
from tests.e2e.external_aes import Aes

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def aes_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def aes_stack(
    aes_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, Child]]:
    stack = new_stack(
        aes_redis,
        tmp_path_factory.mktemp("aes-logs"),
        retry_backoff_seconds="0.05",
        retry_backoff_max_seconds="0.1",
    )
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.wait_ready(api)
        yield stack, api
    finally:
        stack.stop()


def client_redis(stack: LocalStack) -> Redis:
    return Redis.from_url(stack.env["ORCHESTRATOR_REDIS_URL"])


async def start_task(api: Child, tenant: str, session: str, **body: Any) -> str:
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        reply = await http.post(
            "/api/chat/send",
            json={"message": "hello", "session_id": session, "stream": True, **body},
            headers=auth(tenant),
        )
    assert reply.status_code == 202, reply.text
    return str(reply.json()["task_id"])


async def task_state(api: Child, tenant: str, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        reply = await http.get(f"/api/chat/tasks/{task_id}", headers=auth(tenant))
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


SCHEMA_VALID_ANSWERS = {
    "usage_tokens_as_12.0": (
        {"usage": {"input_tokens": 12.0, "output_tokens": 30.0, "cost": 0.5}},
        "completed",
    ),
    "created_at_date_only": ({"created_at": "2026-11-27"}, "failed"),
}


@pytest.mark.parametrize(
    ("extra", "status"), SCHEMA_VALID_ANSWERS.values(), ids=SCHEMA_VALID_ANSWERS.keys()
)
async def test_a_completion_the_schema_admits_is_applied_or_fails_its_task_at_once(
    aes_stack: tuple[LocalStack, Child], extra: dict[str, Any], status: str
) -> None:
    """A completion valid under schemas/execution.completed.json was dead-lettered by the
    worker's strict decoder (JSON Schema's `integer` admits 12.0; a date-only `created_at`
    passes a validator that does not assert formats) and its task left `processing` until
    its deadline, the client told nothing. An integral float is read as an int now; what
    still cannot be read fails the task at once with the reason (the dead letter keeps it)."""
    stack, api = aes_stack
    redis = client_redis(stack)
    aes = Aes(redis, "aes-schema")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session)
    stream, entry, action = await aes.take(task_id)
    body = {"action_type": "execution.completed", "content": "the answer", **extra}
    schema = json.loads((SCHEMAS / "execution.completed.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(
        {**body, "tenant_id": tenant, "session_id": session, "task_id": task_id, "attempt": 1}
    )
    await aes.answer(action, body)
    await aes.ack(stream, entry)
    final = (await events_until(ws, final_of(task_id), timeout=10))[-1]
    await ws.close()
    state = await task_state(api, tenant, task_id)
    dead = await redis.xrange("{dlq}:actions")
    await redis.aclose()
    assert state["status"] == status, state
    if status == "completed":
        assert final["data"]["usage"]["input_tokens"] == 12, final
        assert dead == []
    else:
        assert final["type"] == "chat.error", final
        assert final["data"]["code"] == "malformed_answer", final
        assert "RFC3339" in final["data"]["message"], final
        assert any(task_id.encode() in fields[b"action"] for _, fields in dead), dead


async def test_chunks_of_a_non_streaming_task_reach_the_client(
    aes_stack: tuple[LocalStack, Child],
) -> None:
    """The client asked `stream: false` (a free tier may not stream at all: 403
    `streaming_not_allowed`), and the README's AES section never says an AES must honour the
    action's `stream`. An AES that streams anyway reaches the client chunk by chunk: nothing
    on the orchestrator side holds to what the client asked for."""
    stack, api = aes_stack
    redis = client_redis(stack)
    aes = Aes(redis, "aes-nostream")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session, stream=False)
    stream, entry, action = await aes.take(task_id)
    assert action["stream"] is False
    await aes.answer(action, {"action_type": "execution.chunk", "seq": 1, "delta": "part "})
    await aes.answer(action, {"action_type": "execution.completed", "content": "part all"})
    await aes.ack(stream, entry)
    events = await events_until(ws, final_of(task_id))
    await ws.close()
    await redis.aclose()
    assert [e["type"] for e in events if e["type"] == "chat.chunk"] == [], events


async def test_usage_of_an_answer_streamed_then_cancelled_is_counted(
    aes_stack: tuple[LocalStack, Child],
) -> None:
    """README Tenancy: "the usage the AES reports with `execution.completed` is counted per
    tenant per UTC day". A client that has read the whole streamed answer cancels before the
    completion lands: the AES reports the tokens it spent, and none is counted (the completion
    finds a final task). A budget is dodged by cancelling at the last chunk."""
    stack, api = aes_stack
    redis = client_redis(stack)
    aes = Aes(redis, "aes-budget")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    task_id = await start_task(api, tenant, session)
    stream, entry, action = await aes.take(task_id)
    for seq, word in enumerate(["the ", "whole ", "answer"], start=1):
        await aes.answer(action, {"action_type": "execution.chunk", "seq": seq, "delta": word})
    got = await events_until(ws, lambda e: e["type"] == "chat.chunk" and e["data"]["seq"] == 3)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        reply = await http.post("/api/chat/cancel", json={"task_id": task_id}, headers=auth(tenant))
    assert reply.status_code == 200, reply.text
    # the AES finished generating as the cancel came: it reports what the answer cost
    await aes.answer(
        action,
        {
            "action_type": "execution.completed",
            "content": "the whole answer",
            "usage": {"input_tokens": 700, "output_tokens": 300, "cost": 0.02},
        },
    )
    await aes.ack(stream, entry)
    day_key = "{tn:" + tenant + "}:usage:" + datetime.now(UTC).strftime("%Y-%m-%d")
    for n in range(2):  # two later callbacks applied: the completion's count is done by then
        await aes.raw(
            action["callback_queue"],
            {
                "action_type": "websocket.send",
                "tenant_id": tenant,
                "session_id": session,
                "message": {"n": n},
            },
        )
        await events_until(ws, lambda e: e["type"] == "message")
    tokens = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(3):
            while not tokens:
                tokens = int(await redis.hget(day_key, "tokens") or 0)
                await asyncio.sleep(0.1)
    await ws.close()
    await redis.aclose()
    assert (
        "".join(e["data"]["delta"] for e in got if e["type"] == "chat.chunk") == "the whole answer"
    )
    assert tokens == 1000, tokens

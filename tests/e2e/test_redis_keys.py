"""Every Redis key the product writes: named in README's "Redis keys" table, and living as
long as what refers to it (a task's keys past its deadline, an Idempotency-Key no longer than
its task)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.core import keys
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, deploy, new_stack, redis_client
from tests.integration.test_cli_tenants import orchestrator

pytestmark = pytest.mark.e2e


README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def keys_redis() -> Iterator[RedisServer]:
    """A server of its own: the SCAN of every key sees only what this module's processes wrote."""
    server = RedisServer().start()
    yield server
    server.cleanup()


def readme_key_patterns() -> list[re.Pattern[str]]:
    """Regexes of every key README's "Redis keys" table names (T, S, ID, N, DAY: any part)."""
    text = README.read_text()
    section = text.split("## Redis keys", 1)[1].split("\n## ", 1)[0]
    patterns: list[re.Pattern[str]] = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        names = re.findall(r"`([^`]+)`", first_cell)
        tag = re.match(r"\{[^}]*\}", names[0])
        for name in names:
            if name.startswith(":") and tag is not None:
                name = tag.group(0) + name
            head, _, last = name.rpartition(":")
            options = last.split("/") if "/" in last else [last]
            for option in options:
                full = f"{head}:{option}" if head else option
                parts = re.split(r"([A-Z]+)", full)
                regex = "".join(
                    "[^:{}]+" if i % 2 else re.escape(part) for i, part in enumerate(parts)
                )
                patterns.append(re.compile(f"^{regex}$"))
    return patterns


async def _until(check, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_every_key_written_is_in_the_readme_table(
    keys_redis: RedisServer, tmp_path: Path
) -> None:
    redis = redis_client(keys_redis)
    await redis.flushall()
    with deploy(keys_redis, tmp_path / "logs", **FAST_EXECUTOR) as deployed:
        api = deployed.api
        tenant, session = unique("t"), unique("s")
        async with httpx.AsyncClient() as http:
            ws, _ = await connect(api.ws_url, tenant, session)
            reply = await send(
                http,
                api.url,
                tenant,
                {"message": "hello", "stream": True, "session_id": session},
                **{"Idempotency-Key": "k-1"},
            )
            assert reply.status_code == 202, reply.text
            await events_until(ws, final_of(reply.json()["task_id"]))
            await ws.close()
            status = await http.get(f"{api.url}/api/usage", headers=auth(tenant))
            assert status.status_code in (200, 503), status.text

        # A dead letter (an unreadable callback) and its replay by the documented CLI.
        await redis.xadd(keys.callback_stream(0), {"action": "not json"})
        await _until(
            lambda: _positive(redis.xlen(keys.DEAD_LETTERS)), "the entry to be dead-lettered"
        )
        replayed = await orchestrator(keys_redis.url, "deadletters", "replay", "--all")
        assert replayed.code == 0, replayed
        tiered = await orchestrator(keys_redis.url, "tenants", "set", tenant, "--tier", "pro")
        assert tiered.code == 0, tiered

        found = sorted({k.decode() async for k in redis.scan_iter(count=1000)})
    await redis.aclose()
    patterns = readme_key_patterns()
    unlisted = [key for key in found if not any(p.match(key) for p in patterns)]
    assert not unlisted, (
        f"keys the product wrote that README's 'Redis keys' table does not list: {unlisted}"
    )


async def _positive(awaitable) -> bool:  # type: ignore[no-untyped-def]
    return int(await awaitable) > 0


TASK_TTL = "60"


async def test_a_running_tasks_keys_expire_before_its_deadline(
    keys_redis: RedisServer, tmp_path: Path
) -> None:
    """No executor: the task stays `processing` until its deadline (enterprise: 300 s). Its
    state and location expire after 60 s, so from then on `GET /api/chat/tasks/{id}` and a
    cancel answer 404 for a task still running, a late completion finds no task and is
    dropped (the answer is lost), and its deadline fires on nothing: the client never gets a
    final event."""
    redis = redis_client(keys_redis)
    await redis.flushall()
    stack = new_stack(keys_redis, tmp_path / "logs", task_ttl_seconds=TASK_TTL)
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.wait_ready(api)
        tenant, session = unique("t"), unique("s")
        async with httpx.AsyncClient() as http:
            reply = await send(
                http, api.url, tenant, {"message": "think long", "session_id": session}
            )
            assert reply.status_code == 202, reply.text
            task_id = reply.json()["task_id"]
        state_key = keys.task_state(tenant, session, task_id)
        state = await redis.hgetall(state_key)
        deadline = datetime.fromisoformat(state[b"deadline"].decode()).timestamp()
        left = deadline - time.time()
        assert left > 200, f"enterprise deadline expected ~300 s away, is {left:.0f} s"
        lifetimes = {
            "task state": await redis.pttl(state_key) / 1000,
            "task location": await redis.pttl(keys.task_location(task_id)) / 1000,
        }
    finally:
        stack.stop()
        await redis.aclose()
    short = {name: round(ttl) for name, ttl in lifetimes.items() if ttl < left}
    assert not short, (
        f"a running task's keys expire before its deadline ({left:.0f} s away): {short} s"
    )


async def test_an_idempotency_key_never_outlives_the_task_it_names(
    keys_redis: RedisServer, tmp_path: Path
) -> None:
    """The key was kept 24 hours, the task it names TASK_TTL_SECONDS: once the task expired, a
    retry with the key was taken for a send that never queued its task, and the message was
    sent to the AES a second time within the 24 hours README promised a replay."""
    redis = redis_client(keys_redis)
    await redis.flushall()
    with deploy(keys_redis, tmp_path / "logs", task_ttl_seconds=TASK_TTL, **FAST_EXECUTOR) as d:
        tenant, session = unique("t"), unique("s")
        body = {"message": "pay the invoice", "session_id": session}
        async with httpx.AsyncClient() as http:
            ws, _ = await connect(d.api.ws_url, tenant, session)
            first = await send(http, d.api.url, tenant, body, **{"Idempotency-Key": "order-42"})
            assert first.status_code == 202, first.text
            task_id = first.json()["task_id"]
            await events_until(ws, final_of(task_id))
            await ws.close()
        idem = [k async for k in redis.scan_iter(match=f"{{tn:{tenant}}}:idem:*")]
        key_ttl = await redis.ttl(idem[0])
        task_ttl = min(
            [
                await redis.ttl(keys.task_location(task_id)),
                await redis.ttl(keys.task_state(tenant, session, task_id)),
            ]
        )
    await redis.aclose()
    assert 0 < key_ttl <= task_ttl, (key_ttl, task_ttl)

"""Minutes of overload compressed into seconds: three tiers sending several times what a
two-slot AES can run, with cancels, retries and idempotent resends mixed in; then the load
stops and every task must end in exactly one final state, told once on its socket.

Passes on the current code: kept as a guard of what was found sound (one final event per task
matching its REST status, high tier served first, idempotent resends adding nothing to the
backlog, streams and timer sets empty once the load is over)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection

from services.cli.embedded import RedisServer
from services.core import keys
from tests.e2e.clients import auth, connect, enqueued, unique
from tests.e2e.overload import (
    FINAL,
    saturated_stack,
    send_many,
    set_tier,
    status_of,
    task_hash,
    wait_until,
)

pytestmark = pytest.mark.e2e

FINAL_EVENTS = {"chat.response", "chat.error", "chat.cancelled"}
STATUS_OF_EVENT = {"chat.response": "completed", "chat.cancelled": "cancelled"}


def _sample(text: str, series: str) -> float:
    """One sample of a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


async def _collect(ws: ClientConnection, into: dict[str, list[dict[str, Any]]]) -> None:
    async for raw in ws:
        event = json.loads(raw)
        if event.get("task_id"):
            into[event["task_id"]].append(event)


async def test_every_task_of_an_overload_ends_once(own_redis: RedisServer, tmp_path: Path) -> None:
    redis = Redis.from_url(own_redis.url)
    tiers = {"free": ("low", 3), "pro": ("normal", 3), "enterprise": ("high", 6)}
    tenants = {tier: unique(f"t{tier}") for tier in tiers}
    sessions = {tier: unique("s") for tier in tiers}
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    try:
        with saturated_stack(
            own_redis, tmp_path / "logs", slots=2, executor_chunk_delay_ms="30"
        ) as stack:
            api = stack.api
            for tier, (_, timeout) in tiers.items():
                await set_tier(redis, tenants[tier], tier, timeout, streaming=True)
            sockets = []
            for tier in tiers:
                ws, _ = await connect(api.ws_url, tenants[tier], sessions[tier])
                sockets.append(ws)
            readers = [asyncio.create_task(_collect(ws, events)) for ws in sockets]
            tasks: dict[str, tuple[str, str]] = {}  # task id -> (tier, what)
            keys_sent: list[tuple[str, dict[str, Any], str, str]] = []
            async with httpx.AsyncClient() as http:
                for second in range(8):
                    for tier in tiers:
                        bodies, headers, what = [], [], []
                        for i in range(6):
                            simulate: dict[str, Any] = {"repeat": 2}
                            kind = "plain"
                            if i == 1:
                                simulate["fail_attempts"] = 1
                                kind = "retry"
                            body = {
                                "message": f"m{second}-{i}",
                                "session_id": sessions[tier],
                                "stream": True,
                                "context": {"simulate": simulate},
                            }
                            key = str(uuid.uuid4())
                            bodies.append(body)
                            headers.append({"Idempotency-Key": key})
                            what.append(kind)
                        replies = await send_many(
                            api.url, tenants[tier], bodies, parallel=6, headers=headers
                        )
                        for reply, kind, body, header in zip(
                            replies, what, bodies, headers, strict=True
                        ):
                            assert reply.status_code == 202, reply.text
                            tasks[reply.json()["task_id"]] = (tier, kind)
                            keys_sent.append(
                                (
                                    tenants[tier],
                                    body,
                                    header["Idempotency-Key"],
                                    reply.json()["task_id"],
                                )
                            )
                        # cancel the last one of the batch while it is queued
                        victim = replies[-1].json()["task_id"]
                        cancel = await http.post(
                            f"{api.url}/api/chat/cancel",
                            json={"task_id": victim},
                            headers=auth(tenants[tier]),
                        )
                        assert cancel.status_code in (200, 201, 409), cancel.text
                        tasks[victim] = (tier, "cancelled")
                    # a client retrying on its own timeout: resend a few with the same key
                    for tenant, body, key, first in keys_sent[-6:-3]:
                        again = await http.post(
                            f"{api.url}/api/chat/send",
                            json=body,
                            headers={**auth(tenant), "Idempotency-Key": key},
                        )
                        assert again.status_code in (200, 202), again.text
                        assert again.json()["task_id"] == first
                    await asyncio.sleep(0.5)
                # the load stops: everything must end (longest timeout 6 s)
                tenant_of = {task_id: tenants[tier] for task_id, (tier, _) in tasks.items()}
                statuses: dict[str, str] = {}
                async with asyncio.timeout(30):
                    while len(statuses) < len(tasks):
                        for task_id in tasks:
                            if task_id not in statuses:
                                status = await status_of(http, api.url, tenant_of[task_id], task_id)
                                if status in FINAL:
                                    statuses[task_id] = status
                        await asyncio.sleep(0.3)
            await asyncio.sleep(1.0)  # the last events on their way to the sockets
            for reader in readers:
                reader.cancel()
            for ws in sockets:
                await ws.close()
            problems: list[tuple[Any, ...]] = []
            summary: dict[tuple[str, str, str], int] = defaultdict(int)
            for task_id, (tier, kind) in tasks.items():
                finals = [e for e in events[task_id] if e["type"] in FINAL_EVENTS]
                status = statuses[task_id]
                summary[(tier, kind, status)] += 1
                if len(finals) != 1:
                    problems.append((task_id, tier, kind, status, [e["type"] for e in finals]))
                    continue
                final = finals[0]
                told = STATUS_OF_EVENT.get(final["type"])
                if told is None:
                    code = final["data"].get("code")
                    told = "timed_out" if code == "timed_out" else "failed"
                if told != status:
                    problems.append((task_id, tier, kind, status, final))
            retried = 0
            for task_id, (tier, _) in tasks.items():
                state = await task_hash(redis, tenants[tier], sessions[tier], task_id)
                retried += int(state.get("attempt") or 1) - 1
            added = await enqueued(redis)
            assert not problems, problems[:10]
            assert not summary[("enterprise", "plain", "timed_out")], "high tier overtaken"
            # Each task's first attempt, and its retries unless it ended in the backoff (the
            # attempt counts up at the requeue); the 24 idempotent resends added nothing.
            assert len(tasks) <= added <= len(tasks) + retried
            streams = [keys.aes_stream(p) for p in keys.PRIORITIES] + [
                keys.callback_stream(n) for n in range(8)
            ]

            async def released() -> bool:
                return all([await redis.xlen(name) == 0 for name in streams])

            await wait_until(released, timeout=15)  # trimmed every 5 s once all acked
            for n in range(8):
                assert not await redis.zcard(keys.partition_deadlines(n))
                assert not await redis.zcard(keys.partition_retries(n))
            # No run wasted on a task nobody waits for: the executor completed exactly the
            # tasks that completed (queued ones that timed out or were cancelled were skipped).
            executor = next(c for c in stack.stack.children if c.role == "executor")
            async with httpx.AsyncClient() as http:
                text = (await http.get(f"http://127.0.0.1:{executor.metrics_port}/metrics")).text
            runs = _sample(text, 'orchestrator_executor_tasks_total{outcome="completed"}')
            assert runs == sum(s == "completed" for s in statuses.values())
    finally:
        await redis.aclose()

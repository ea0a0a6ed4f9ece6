"""Shared set-up of the overload review: a real stack whose AES is saturated (the reference
executor with a few slots), tenants with short task timeouts, and concurrent REST senders.

Everything is real: Valkey, uvicorn api, worker and executor processes, httpx and websockets
clients. Only the sizes are small, so each test stays within seconds on a 2-core machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core import keys
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import auth, send
from tests.e2e.conftest import Deployment, deploy

FINAL = {"completed", "failed", "cancelled", "timed_out"}
UNLIMITED_RATE = {"requestsPerMinutePerSession": 1_000_000, "requestsPerMinutePerTenant": 1_000_000}


@contextmanager
def saturated_stack(
    redis: RedisServer, log_dir: Path, *, slots: int = 1, **settings: str
) -> Iterator[Deployment]:
    """api, worker and a reference executor with `slots` slots (its capacity), short retries."""
    base = {
        "executor_concurrency": str(slots),
        "executor_chunk_delay_ms": "20",
        "retry_backoff_seconds": "0.05",
        "retry_backoff_max_seconds": "0.1",
        **settings,
    }
    with deploy(redis, log_dir, **base) as deployed:
        yield deployed


async def set_tier(redis: Redis, tenant: str, tier: str, timeout: int, **limits: Any) -> None:
    """The tenant's record: `tier` with `taskTimeoutSeconds=timeout` and no rate limits in the
    way (the review is about the AES's capacity, not the api's admission)."""
    store = QuotaStore(redis, load_settings())
    await store.set(tenant, tier, {**UNLIMITED_RATE, "taskTimeoutSeconds": timeout, **limits})


async def send_many(
    base: str,
    tenant: str,
    bodies: list[dict[str, Any]],
    *,
    parallel: int = 16,
    headers: list[dict[str, str]] | None = None,
) -> list[httpx.Response]:
    """POST every body to /api/chat/send, `parallel` at a time, in order of the list."""
    replies: list[httpx.Response | None] = [None] * len(bodies)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)

    async def sender(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            extra = headers[i] if headers else {}
            replies[i] = await send(http, base, tenant, bodies[i], **extra)

    limits = httpx.Limits(max_connections=parallel)
    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*(sender(http) for _ in range(parallel)))
    return [r for r in replies if r is not None]


async def status_of(http: httpx.AsyncClient, base: str, tenant: str, task_id: str) -> str:
    reply = await http.get(f"{base}/api/chat/tasks/{task_id}", headers=auth(tenant), timeout=10)
    assert reply.status_code == 200, reply.text
    status: str = reply.json()["status"]
    return status


async def task_hash(redis: Redis, tenant: str, session: str, task_id: str) -> dict[str, str]:
    raw = await redis.hgetall(keys.task_state(tenant, session, task_id))
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def wait_until(predicate: Any, timeout: float, every: float = 0.1) -> None:
    """Poll an async predicate until it holds (Redis state has no event to await)."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(every)

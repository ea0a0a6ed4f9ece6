"""A chat message that has been answered, delivered and acknowledged everywhere must not keep
Redis memory.

The AES streams (`{aes}:actions:*`) and the callback partitions (`{cb:N}:callbacks`) kept every
entry after it was acknowledged: the only bound was `MAXLEN ~ 1 000 000` per stream, over
100 KB per 3 200-character message, growing with the day's traffic to several GB. The worker
now trims, every few seconds, the entries every consumer group has read and acknowledged
(services/worker/trim.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core import keys
from services.worker.trim import TRIM_SECONDS
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.conftest import Deployment

TASKS = 40
MESSAGE = "please summarise this paragraph " * 100  # ~3 200 characters, a modest prompt
# What may stay: the newest stream node of each stream (`MINID ~` trims whole nodes of at
# most 4 KB), far below one message's entries (~100 KB before the fix).
KEPT_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def e2e_redis() -> Iterator[RedisServer]:
    """A Redis of this module's own (its `deployment` too): every group's pending entries and
    every stream's bytes are measured, and an earlier module's killed process leaves some."""
    server = RedisServer().start()
    yield server
    server.cleanup()


def _streams() -> list[tuple[str, str]]:
    return [(keys.callback_stream(p), keys.WORKER_GROUP) for p in range(8)] + [
        (keys.aes_stream(p), keys.AES_GROUP) for p in keys.PRIORITIES
    ]


async def _sizes(redis: Redis) -> tuple[int, int, int]:
    """Entries held, bytes held and entries ever added, over all the streams."""
    entries = memory = added = 0
    for stream, _ in _streams():
        entries += await redis.xlen(stream)
        memory += await redis.memory_usage(stream, samples=0) or 0
        if await redis.exists(stream):
            added += int((await redis.xinfo_stream(stream))["entries-added"])
    return entries, memory, added


async def _all_acknowledged(redis: Redis) -> bool:
    for stream, group in _streams():
        for info in await redis.xinfo_groups(stream):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name == group and (info["pending"] or info.get("lag")):
                return False
    return True


async def _answer(http: httpx.AsyncClient, deployment: Deployment, tenant: str) -> None:
    """One streamed chat message, sent and answered to its final event."""
    api = deployment.api
    session = unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    body = {"message": MESSAGE, "session_id": session, "stream": True}
    reply = await send(http, api.url, tenant, body)
    assert reply.status_code == 202, reply.text
    events = await events_until(ws, final_of(reply.json()["task_id"]))
    assert events[-1]["type"] == "chat.response", events[-1]
    await ws.close()


async def _eventually(condition: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    """Poll a condition held in Redis (the groups' counts, the streams' sizes: nothing to
    subscribe to) until true or `seconds` passed; whether it came true."""
    deadline = time.monotonic() + seconds
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def test_acknowledged_stream_entries_are_released(deployment: Deployment) -> None:
    redis = Redis.from_url(deployment.stack.env["ORCHESTRATOR_REDIS_URL"])
    tenant = unique("soak")

    async def released() -> bool:
        _, memory, _ = await _sizes(redis)
        return memory - memory_before < KEPT_BYTES

    try:
        entries_before, memory_before, added_before = await _sizes(redis)
        async with httpx.AsyncClient() as http:
            for _ in range(TASKS // 10):
                await asyncio.gather(*(_answer(http, deployment, tenant) for _ in range(10)))
        # The last acks go with the next read.
        assert await _eventually(lambda: _all_acknowledged(redis), 20), "never acknowledged"
        await _eventually(released, 4 * TRIM_SECONDS)  # the worker's next trimming rounds
        entries_after, memory_after, added_after = await _sizes(redis)
    finally:
        await redis.aclose()
    assert added_after - added_before > TASKS * 10  # the messages and their chunks went through
    kept_entries = entries_after - entries_before
    kept_bytes = memory_after - memory_before
    assert kept_bytes < KEPT_BYTES, (
        f"{TASKS} answered and acknowledged messages still hold {kept_entries} stream entries, "
        f"{kept_bytes} bytes ({kept_bytes // TASKS} bytes per message) of Redis memory"
    )

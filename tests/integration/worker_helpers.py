"""Shared helpers of the worker hunt: real worker processes on the suite's real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from services.core import events, keys
from services.core.actions import ACTION_FIELD, WebsocketSend, encode_action


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll a condition held in Redis (nothing to subscribe to) until true, bounded."""
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.05)


async def holders(redis: Redis, partitions: int) -> dict[int, str | None]:
    """Who holds each partition's lease."""
    values = await redis.mget([keys.partition_lease(p) for p in range(partitions)])
    return {p: (v.decode() if v else None) for p, v in enumerate(values)}


def send_action(tenant: str, session: str, n: int) -> bytes:
    return encode_action(WebsocketSend(tenant_id=tenant, session_id=session, message={"n": n}))


async def messages(redis: Redis, tenant: str, session: str) -> list[int]:
    entries = await redis.xrange(keys.session_log(tenant, session))
    frames = [json.loads(b"{" + fields[b"e"]) for _, fields in entries]
    return [f["data"]["n"] for f in frames if f["type"] == events.MESSAGE]


async def add_send(redis: Redis, partition: int, tenant: str, session: str, n: int) -> str:
    entry = await redis.xadd(
        keys.callback_stream(partition), {ACTION_FIELD: send_action(tenant, session, n)}
    )
    return entry.decode() if isinstance(entry, bytes) else str(entry)

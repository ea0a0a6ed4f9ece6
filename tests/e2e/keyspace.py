"""What a Redis keyspace holds, each key with its type and ttl: the tests of what nothing in
Redis may keep for ever (README "Redis keys")."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis

# Keys README's "Redis keys" table names as installation-wide (one per installation, per
# partition or per tier table): they may live without a ttl.
GLOBAL = [
    r"^\{aes\}:actions:(high|normal|low)$",
    r"^\{aes\}:cancel$",
    r"^\{cb:\d+\}:(callbacks|deadlines|retries)$",
    r"^\{cb\}:partitions$",
    r"^\{persist\}:records$",
    r"^\{dlq\}:actions$",
    r"^\{workers\}:(heartbeats|departures)$",
    r"^\{quota\}:(tenants|tiers)$",
    r"^\{tasks\}:index-since$",
]
# Written by an operator (`orchestrator tenants set`, the TierQuota operator): kept on purpose.
OPERATOR = [r"^\{tn:[^}]+\}:(quota|quota-owner|quota-contenders)$"]


@dataclass(frozen=True)
class Key:
    name: str
    type: str
    ttl: int  # seconds; -1: none


async def keyspace(redis: Redis) -> dict[str, Key]:
    found: dict[str, Key] = {}
    async for raw in redis.scan_iter(count=1000):
        name = raw.decode() if isinstance(raw, bytes) else raw
        kind = await redis.type(name)
        ttl = await redis.ttl(name)
        if ttl == -2:
            continue
        found[name] = Key(name, kind.decode() if isinstance(kind, bytes) else kind, ttl)
    return found


def without_ttl(found: dict[str, Key]) -> list[Key]:
    """Keys with no ttl that are not installation-wide or an operator's record: per session,
    per task or per tenant request, they are never freed."""
    allowed = [re.compile(p) for p in GLOBAL + OPERATOR]
    return sorted(
        (k for k in found.values() if k.ttl == -1 and not any(p.match(k.name) for p in allowed)),
        key=lambda k: k.name,
    )


def mentioning(found: dict[str, Key], *parts: str) -> dict[str, Key]:
    return {name: k for name, k in found.items() if any(p in name for p in parts)}


async def until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0, step: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(step)

"""With thousands of tenants in the quota store, a send reads no quota
record once the api's cache is warm, and one tenant's change, announced to every api, drops
that tenant's entry only (no reload of every tenant). Watched on a real api with MONITOR."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer, free_port
from services.cli.stack import Child
from services.core import keys
from services.core.quotas import QuotaRecord, QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import auth
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e

TENANTS = 3_000
SENDERS = 150


@pytest.fixture
def lone_api(tmp_path: Path) -> Iterator[tuple[RedisServer, Child]]:
    server = RedisServer(port=free_port()).start()
    stack = new_stack(server, tmp_path / "logs")
    try:
        api = stack.start_api()
        stack.wait_ready(api)
        yield server, api
    finally:
        stack.stop()
        server.cleanup()


class QuotaReads:
    """Every GET of a quota record Redis executes while watching (MONITOR)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.seen: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def _watch(self) -> None:
        async with self.redis.monitor() as monitor:
            self._ready.set()
            async for command in monitor.listen():
                words = str(command.get("command", "")).split()
                if words[:1] == ["GET"] and words[-1].endswith(":quota"):
                    self.seen.append(words[-1])

    async def __aenter__(self) -> QuotaReads:
        self._task = asyncio.create_task(self._watch())
        await asyncio.wait_for(self._ready.wait(), 5)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.redis.ping()  # what MONITOR shows before this has been seen
        await asyncio.sleep(0.2)
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _sends(http: httpx.AsyncClient, tenants: list[str]) -> None:
    for tenant in tenants:
        reply = await http.post(
            "/api/chat/send", json={"message": "m", "session_id": "s"}, headers=auth(tenant)
        )
        assert reply.status_code == 202, reply.text


async def _applied(http: httpx.AsyncClient, tenant: str) -> None:
    """Returns once the api holds the tenant's new tier (free: no streaming, refused 403)."""
    body = {"message": "m", "session_id": "s", "stream": True}
    async with asyncio.timeout(5):
        while True:
            reply = await http.post("/api/chat/send", json=body, headers=auth(tenant))
            if reply.status_code == 403:
                return
            await asyncio.sleep(0.02)


async def test_warm_sends_read_no_quota_and_a_change_reloads_one_tenant(
    lone_api: tuple[RedisServer, Child],
) -> None:
    server, api = lone_api
    redis = Redis.from_url(server.url)
    watcher = Redis.from_url(server.url)
    try:
        now = datetime.now(UTC)
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(TENANTS):
                record = QuotaRecord(tenant_id=f"tenant-{n:05d}", tier="pro", updated_at=now)
                pipe.set(keys.tenant_quota(record.tenant_id), msgspec.json.encode(record))
                pipe.sadd(keys.QUOTA_TENANTS, record.tenant_id)
            await pipe.execute()
        senders = [f"tenant-{n:05d}" for n in range(0, TENANTS, TENANTS // SENDERS)]
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            async with QuotaReads(watcher) as cold:
                await _sends(http, senders)
            async with QuotaReads(watcher) as warm:
                await _sends(http, senders)
            async with QuotaReads(watcher) as changed:
                await QuotaStore(redis, load_settings()).set(senders[0], "free")
                await _applied(http, senders[0])
                await _sends(http, senders)
    finally:
        await redis.aclose()
        await watcher.aclose()
    assert len(cold.seen) == len(senders)
    assert warm.seen == []
    assert changed.seen == [keys.tenant_quota(senders[0])]

"""`orchestrator tenants list` on a quota store of thousands of tenants, run as the real
command against a real Valkey."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import msgspec
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer, free_port
from services.core import keys
from services.core.quotas import QuotaRecord
from tests.integration.test_cli_tenants_paging_ids import tenants as run_tenants

TENANTS = 2_000


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    started = RedisServer(port=free_port()).start()
    yield started
    started.cleanup()


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[Redis]:
    """The quota store of TENANTS tenants, written as `QuotaStore.set` writes them."""
    redis = Redis.from_url(server.url)
    await redis.flushall()
    now = datetime.now(UTC)
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(TENANTS):
            tenant = f"tenant-{n:05d}"
            record = QuotaRecord(tenant_id=tenant, tier="pro", updated_at=now)
            pipe.set(keys.tenant_quota(tenant), msgspec.json.encode(record))
            pipe.sadd(keys.QUOTA_TENANTS, tenant)
        await pipe.execute()
    yield redis
    await redis.aclose()


async def tenants(server: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    return await run_tenants(server.url, *args)


async def test_one_unreadable_record_does_not_hide_every_other_tenant(
    server: RedisServer, store: Redis
) -> None:
    """`QuotaStore.list` decoded every record and raised on the first it could not read, so
    `tenants list` printed nothing but that error: one hand-edited or damaged record among
    thousands left the admin with no listing at all. (`get` of that tenant being loud is
    right; the others' records are fine.) Now the rest is listed and the exit status is 1."""
    await store.set(keys.tenant_quota("tenant-01234"), b'{"tier": 3}')
    listed = await tenants(server, "list")
    assert listed.stdout.strip(), f"nothing listed (exit {listed.returncode}): {listed.stderr}"
    shown = [record["tenantId"] for record in json.loads(listed.stdout)]
    assert len(shown) == TENANTS - 1
    assert "tenant-01234" in listed.stderr, "the unreadable record is named"
    assert listed.returncode == 1


async def test_the_listing_pages_like_deadletters_list(server: RedisServer, store: Redis) -> None:
    """Thousands of tenants came out as one JSON array of every record (50 000 tenants: 9 MB,
    ~2 s, one SMEMBERS of the whole index and one pipeline of 50 000 GETs); unlike
    `deadletters list`, there was no `--limit`/`--after` to read it a page at a time. The
    next page's command is on stderr (stdout stays one JSON array), only when there is one."""
    first = await tenants(server, "list", "--limit", "100")
    assert first.returncode == 0, first.stderr
    page = json.loads(first.stdout)
    assert [record["tenantId"] for record in page] == [f"tenant-{n:05d}" for n in range(100)]
    after = await tenants(server, "list", "--limit", "100", "--after", "tenant-00099")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)[0]["tenantId"] == "tenant-00100"
    assert "--limit 100 --after=tenant-00099" in first.stderr, first.stderr
    last = await tenants(server, "list", "--limit", "100", "--after", f"tenant-{TENANTS - 101:05d}")
    assert last.returncode == 0, last.stderr
    assert len(json.loads(last.stdout)) == 100
    assert "more:" not in last.stderr, last.stderr
    refused = await tenants(server, "list", "--limit", "0")
    assert refused.returncode == 2  # a bad argument, as README says
    assert "--limit: must be at least 1" in refused.stderr

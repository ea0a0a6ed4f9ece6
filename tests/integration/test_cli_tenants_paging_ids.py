"""`orchestrator tenants list --limit N` prints the next page's command on stderr; run as the
real command against a real Valkey, that command must work for every valid tenant id."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
from datetime import UTC, datetime

import msgspec
from redis.asyncio import Redis

from services.core import keys
from services.core.ids import is_valid_id
from services.core.quotas import QuotaRecord


async def tenants(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRATOR_REDIS_URL": redis_url}
    command = [sys.executable, "-m", "services.cli.main", "tenants", *args]
    return await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
    )


async def test_the_next_page_command_works_for_a_tenant_id_starting_with_a_dash(
    redis: Redis, redis_url: str
) -> None:
    """ID_PATTERN allows a leading '-' (and '-' sorts before digits and letters, so such
    tenants come first). The hint printed `--after -a`, which argparse reads as an option:
    the admin who ran it got 'expected one argument' (exit 2) and could not reach page 2."""
    now = datetime.now(UTC)
    for tenant in ("-a", "-b", "c"):
        assert is_valid_id(tenant)
        record = QuotaRecord(tenant_id=tenant, tier="pro", updated_at=now)
        await redis.set(keys.tenant_quota(tenant), msgspec.json.encode(record))
        await redis.sadd(keys.QUOTA_TENANTS, tenant)
    first = await tenants(redis_url, "list", "--limit", "1")
    assert first.returncode == 0, first.stderr
    assert [r["tenantId"] for r in json.loads(first.stdout)] == ["-a"]
    hint = next(line for line in first.stderr.splitlines() if line.startswith("more: "))
    command = shlex.split(hint.removeprefix("more: "))
    assert command[:3] == ["orchestrator", "tenants", "list"], hint
    second = await tenants(redis_url, *command[2:])
    assert second.returncode == 0, f"{hint!r} fails: {second.stderr}"
    assert [r["tenantId"] for r in json.loads(second.stdout)] == ["-b"]

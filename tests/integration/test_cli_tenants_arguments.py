"""`orchestrator tenants ...` as a platform team uses it: real processes, real Redis."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from redis.asyncio import Redis

from services.core import keys
from tests.integration.test_cli_tenants import orchestrator


async def test_tenants_list_with_a_bad_limit_exits_2_like_every_bad_argument(
    redis: Redis, redis_url: str
) -> None:
    """README ("Commands"): `tenants ...` exits "2 for bad arguments". `tenants list --limit 0`
    (or a negative one) is a bad argument, yet it exits 1, the code README reserves for "an
    unknown tenant or one a TierQuota manages" (and Redis unreachable): a script cannot tell
    its own mistake from a missing tenant. (tests/integration/test_cli_tenants_many.py pins
    the 1; one of the two must change.)"""
    for bad in ("0", "-3"):
        run = await orchestrator(redis_url, "tenants", "list", f"--limit={bad}")
        assert "--limit" in run.stderr
        assert run.code == 2, (bad, run.code, run.stderr)


async def test_tenants_set_refuses_a_session_rate_above_the_tenant_rate_like_the_crd(
    redis: Redis, redis_url: str
) -> None:
    """DESIGN §5 and docs/operator.md: `--limit` takes "the same keys" as `spec.limits`, and
    the spec's `requestsPerMinutePerSession` "may not exceed its tenant's". The CRD refuses
    {session: 1000, tenant: 10}; `tenants set` accepts it (exit 0), stores it, and `effective`
    claims 1000 requests per minute per session where the tenant's 10 bind: the platform
    team's setting is silently not what is enforced."""
    run = await orchestrator(
        redis_url, "tenants", "set", "acme", "--tier", "pro",
        "--limit", "requestsPerMinutePerSession=1000", "requestsPerMinutePerTenant=10",
    )  # fmt: skip
    assert run.code == 2, run.stdout
    assert "requestsPerMinutePerSession" in run.stderr
    assert await redis.get(keys.tenant_quota("acme")) is None


async def test_a_failed_set_leaves_the_previous_record_untouched(
    redis: Redis, redis_url: str
) -> None:
    """Guard: a `set` refused for a bad tier, a bad limit or a bad agent (exit 2) keeps the
    record and effective limits from before (nothing half-written)."""
    assert (await orchestrator(
        redis_url, "tenants", "set", "acme", "--tier", "pro", "--limit", "maxConnections=7"
    )).code == 0  # fmt: skip
    before = await redis.get(keys.tenant_quota("acme"))
    for args in (
        ("--tier", "gold"),
        ("--tier", "free", "--limit", "maxConnections=0"),
        ("--tier", "free", "--limit", "maxConnections=3", "priority=urgent"),
        ("--tier", "free", "--allowed-agents", "ok,not ok"),
    ):
        run = await orchestrator(redis_url, "tenants", "set", "acme", *args)
        assert run.code == 2, (args, run.stderr)
        assert run.stderr.count("\n") == 1, run.stderr
        assert await redis.get(keys.tenant_quota("acme")) == before, args
    shown = (await orchestrator(redis_url, "tenants", "get", "acme")).json()
    assert shown["effective"]["limits"]["maxConnections"] == 7


@pytest.mark.parametrize("tenant", ["", "a b", "x" * 65, "ä"])
async def test_every_subcommand_refuses_an_invalid_tenant_id_with_exit_2(
    redis: Redis, redis_url: str, tenant: str
) -> None:
    """Guard: set, get and delete refuse an id outside [A-Za-z0-9_-]{1,64} with exit 2 and
    one line; nothing is written."""
    for args in (("set", tenant, "--tier", "pro"), ("get", tenant), ("delete", tenant)):
        run = await orchestrator(redis_url, "tenants", *args)
        assert run.code == 2, (args, run.stderr)
        assert "must match" in run.stderr
    assert await redis.dbsize() == 0


async def test_get_of_an_unknown_tenant_names_the_environments_default_tier(
    redis: Redis, redis_url: str
) -> None:
    """Guard: README: `tenants get` of an unknown tenant names the default tier of the
    environment it runs in (ORCHESTRATOR_DEFAULT_TIER), exit 1."""

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "tenants", "get", "nobody",
        env={"PATH": os.environ.get("PATH", ""), "ORCHESTRATOR_REDIS_URL": redis_url,
             "ORCHESTRATOR_DEFAULT_TIER": "enterprise"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 1
    assert out == b""
    assert "'enterprise'" in err.decode()

"""An api records the tier table it serves at start, and `orchestrator tenants set` from a
shell without the installation's ORCHESTRATOR_TIERS refuses a tier the apis know otherwise
(it wrote it, said it was in force, and the apis served their default tier instead). Found
by the tenancy review."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from services.cli.embedded import RedisServer
from services.core import keys
from services.core.tiers import DEFAULT_TIERS
from tests.e2e.conftest import new_stack, redis_client
from tests.integration.test_cli_tenants import orchestrator

pytestmark = pytest.mark.e2e


async def test_a_tier_only_the_apis_define_is_refused_by_a_cli_without_their_table(
    e2e_redis: RedisServer, tmp_path: Path
) -> None:
    team = {**msgspec.to_builtins(DEFAULT_TIERS["pro"]), "maxConnections": 7}
    stack = new_stack(e2e_redis, tmp_path / "logs", tiers=json.dumps({"team": team}))
    try:
        api = stack.start_api()
        stack.wait_ready(api)
        refused = await orchestrator(e2e_redis.url, "tenants", "set", "acme", "--tier", "team")
        assert refused.code == 2, refused
        assert "the apis have a tier 'team', this command's tier table has not" in (refused.stderr)
        accepted = await orchestrator(e2e_redis.url, "tenants", "set", "acme", "--tier", "pro")
        assert accepted.code == 0, accepted  # a tier both tables define alike
        await orchestrator(e2e_redis.url, "tenants", "delete", "acme")
    finally:
        stack.stop()
        redis = redis_client(e2e_redis)
        await redis.delete(keys.INSTALLED_TIERS)  # the next tests' apis record their own
        await redis.aclose()

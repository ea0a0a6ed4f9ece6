"""The start-up warning about an evicting Redis (real Valkey, real uvicorn api process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from tests.e2e.conftest import lone_api

pytestmark = pytest.mark.e2e


async def test_the_eviction_policy_warning_is_a_json_log_line(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """README: "The api, worker and executor log one warning at start naming the policy when
    it is not noeviction", and logs are JSON lines on stdout. The warning is written by
    `verify_topology`, which `main()` runs before `configure_logging`: it reaches Python's
    last-resort handler, a bare text line on stderr with no level, service or timestamp
    (a JSON log pipeline drops or mangles the one warning about silent data loss)."""
    await redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with lone_api(redis_server, tmp_path / "logs") as api:
            output = api.output(200_000)
    finally:
        await redis.config_set("maxmemory-policy", "noeviction")
    lines = [line for line in output.splitlines() if "maxmemory-policy" in line]
    assert lines, output[-2000:]
    for line in lines:
        try:
            parsed = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
        assert (parsed["level"], parsed["service"]) == ("WARNING", "api")

"""An SRE on call runs the one-shot commands README's "Commands" and "Changing
CALLBACK_PARTITIONS" describe, against a real Redis (the session's embedded server)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core import keys
from tests.integration.start_checks import ROOT, base_env


def orchestrator(redis_url: str, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=base_env(redis_url, **({"callback_partitions": "8"} | settings)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_partitions_set_refuses_while_in_flight_even_when_no_count_is_recorded(
    redis: Redis, redis_url: str
) -> None:
    """README: `orchestrator partitions set N` is "refused with exit 1 while anything is in
    flight; --force changes it anyway, losing those answers and deadlines".

    With no count recorded yet in `{cb}:partitions` (an installation upgraded from a version
    that did not record it, or the key deleted by hand), `orchestrator partitions` itself
    reports the task in flight on the configured 8 partitions, yet `partitions set 16`
    changes the count at once with exit 0 and no warning: the workers started with 16 then
    never read partition 3's deadline or callbacks, and that task's answer is lost.
    Expected: exit 1 with the same refusal as when a count is recorded."""
    await redis.delete(keys.CALLBACK_PARTITION_COUNT)
    await redis.zadd(keys.partition_deadlines(3), {"acme/s1/task-1": 9_999_999_999_999})
    await redis.xadd(keys.callback_stream(3), {"event": b"{}"})

    shown = orchestrator(redis_url, "partitions")
    assert shown.returncode == 0, shown.stderr
    held = json.loads(shown.stdout)
    assert held["recorded"] is None
    assert held["tasks_in_flight"] == 1
    assert held["callbacks_unapplied"] == 1

    changed = orchestrator(redis_url, "partitions", "set", "16")
    recorded = await redis.get(keys.CALLBACK_PARTITION_COUNT)
    assert changed.returncode == 1, (
        f"exit {changed.returncode}, recorded {recorded!r}, stdout {changed.stdout!r}"
    )
    assert recorded is None


async def test_deadletters_list_with_a_huge_limit_is_a_bad_argument(
    redis: Redis, redis_url: str
) -> None:
    """README ("Commands"): exit 2 for bad arguments. `deadletters list --limit 0` is refused
    with exit 2 and a line naming `--limit`, but a `--limit` above what Redis's COUNT takes
    (2**63) reaches Redis and comes back as exit 1 with Redis's words:
    `orchestrator deadletters: ResponseError: value is not an integer or out of range`,
    which reads like a Redis fault, not a typo in the command line."""
    done = orchestrator(redis_url, "deadletters", "list", "--limit", "99999999999999999999")
    assert (done.returncode, "--limit" in done.stderr) == (2, True), done.stderr


@pytest.fixture
def redis_with_password() -> Iterator[RedisServer]:
    server = RedisServer().start()
    import redis as sync_redis

    sync_redis.Redis(port=server.port).config_set("requirepass", "Right-Pw-123")
    yield server
    server.cleanup()


@pytest.mark.parametrize("password", ["", ":Wrong-Pw-999@"])
def test_a_redis_that_refuses_the_credentials_is_not_reported_unreachable(
    redis_with_password: RedisServer, password: str
) -> None:
    """An SRE runs `orchestrator partitions` (or `tenants`, `deadletters`) with the Redis
    password missing or stale (a rotation). Redis answered and refused the credentials, yet
    the line says `orchestrator: cannot reach Redis: HELLO must be called with the client
    already authenticated, ...` (no password) or `cannot reach Redis: invalid
    username-password pair or user is disabled.`: "cannot reach" sends the SRE to the network
    and the Service, not to the Secret. `orchestrator migrate`/`prune` already tell the two
    apart for PostgreSQL ("PostgreSQL refused" vs "unreachable").
    Expected: a line that says Redis refused the credentials (exit 1 as now)."""
    url = f"redis://{password}127.0.0.1:{redis_with_password.port}/0"
    done = orchestrator(url, "partitions")
    assert done.returncode == 1, done.stderr
    assert "Wrong-Pw-999" not in done.stdout + done.stderr
    assert "cannot reach" not in done.stderr, done.stderr

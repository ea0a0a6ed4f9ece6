"""Every `orchestrator` command of README "Commands" that talks to Redis, run by an SRE against
a Sentinel installation whose primary and sentinels require passwords: the primary's in
ORCHESTRATOR_REDIS_URL, the sentinels' own in ORCHESTRATOR_REDIS_SENTINEL_USERNAME/_PASSWORD."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from services.core import keys
from services.core.actions import ACTION_FIELD
from tests.e2e.secured_sentinel import PRIMARY_PASSWORD, SENTINEL_PASSWORD, SecuredSentinel, cli
from tests.integration.worker_helpers import send_action


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SecuredSentinel]:
    deployment = SecuredSentinel().start()
    yield deployment
    deployment.cleanup()


def test_every_redis_command_works_through_password_protected_sentinels(
    sentinel: SecuredSentinel,
) -> None:
    """Guard (no existing test runs the CLI against sentinels or a password-protected primary):
    tenants set/get/list/delete, partitions, deadletters list/replay/discard."""
    env = sentinel.env()

    def run(*args: str) -> str:
        done = cli(env, *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    record = json.loads(
        run("tenants", "set", "acme", "--tier", "pro", "--limit", "maxConnections=7")
    )
    assert record["limits"] == {"maxConnections": 7}
    assert json.loads(run("tenants", "get", "acme"))["tier"] == "pro"
    assert "acme" in run("tenants", "list", "--limit", "10")
    assert json.loads(run("partitions"))["configured"] == 8
    primary = redis.Redis(port=sentinel.master_port(), password=PRIMARY_PASSWORD)
    try:
        ids = []
        for n in range(2):
            record = {
                "stream": keys.callback_stream(0), "entry_id": "1-0", "group": "workers",
                "reason": "handler failed: x", "at": "2026-11-27T00:00:00Z",
                ACTION_FIELD: send_action("acme", "s1", n),
            }  # fmt: skip
            ids.append(primary.xadd(keys.DEAD_LETTERS, record).decode())  # type: ignore[arg-type]
        listed = run("deadletters", "list", "--json")
        assert all(entry_id in listed for entry_id in ids), listed
        run("deadletters", "replay", ids[0])
        run("deadletters", "discard", ids[1])
        assert primary.xlen(keys.DEAD_LETTERS) == 0
        assert primary.xlen(keys.callback_stream(0)) == 1
        run("tenants", "delete", "acme")
    finally:
        primary.close()


def test_a_wrong_sentinel_password_is_named_as_such_in_one_line(
    sentinel: SecuredSentinel,
) -> None:
    """README "Commands": a command that cannot use Redis exits 1 with one line saying which
    (unreachable, or refusing the credentials); `not_reached` exists so that refused
    credentials do not send an SRE to the network. Expected, with a wrong (or missing)
    ORCHESTRATOR_REDIS_SENTINEL_PASSWORD: one line saying the sentinels refused the
    credentials and naming the variable to fix. Instead: `orchestrator: cannot reach Redis:
    No master found for 'mymaster' : 127.0.0.1:P - auth:AuthenticationError, ...`: "cannot
    reach", the sentinel variables unnamed."""
    for password in ("wrong-sentinel-pw", ""):
        done = cli(sentinel.env(redis_sentinel_password=password), "tenants", "list")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1, done
        assert len(lines) == 1, done.stderr
        for secret in (password or "\0", PRIMARY_PASSWORD, SENTINEL_PASSWORD):
            assert secret not in done.stderr + done.stdout
        assert "cannot reach" not in lines[0], lines[0]
        assert "ORCHESTRATOR_REDIS_SENTINEL_PASSWORD" in lines[0], lines[0]


def test_a_wrong_primary_password_is_named_in_one_line_without_echoing_it(
    sentinel: SecuredSentinel,
) -> None:
    """Guard: the primary's password from REDIS_URL refused gives one line naming
    ORCHESTRATOR_REDIS_URL, without the password (in sentinel mode, where the URL's host is
    ignored)."""
    url = sentinel.url.replace(PRIMARY_PASSWORD, "not-the-Password-1")
    done = cli(sentinel.env(redis_url=url), "tenants", "get", "acme")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done
    assert len(lines) == 1, done.stderr
    assert "refused the credentials" in lines[0]
    assert "ORCHESTRATOR_REDIS_URL" in lines[0]
    assert "not-the-Password-1" not in done.stderr + done.stdout

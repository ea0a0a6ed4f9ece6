"""What README "Commands" promises an SRE whose Redis is unreachable or
frozen, for every command that talks to Redis: exit 1, one line, no traceback, and never
the password of `ORCHESTRATOR_REDIS_URL`. No other test runs every command this way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from services.cli.embedded import RedisServer, free_port
from tests.integration.start_checks import ROOT, base_env

PASSWORD = "Guard-S3cret-pw"

COMMANDS = [
    ["partitions"],
    ["partitions", "set", "4"],
    ["deadletters", "list"],
    ["deadletters", "list", "--json"],
    ["deadletters", "replay", "--all"],
    ["deadletters", "discard", "1-0"],
    ["tenants", "get", "acme"],
    ["tenants", "list"],
    ["tenants", "set", "acme", "--tier", "pro"],
    ["tenants", "delete", "acme"],
]


def run(url: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=base_env(url), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_unreachable_redis_is_one_line_exit_1_without_the_password(args: list[str]) -> None:
    done = run(f"redis://admin:{PASSWORD}@127.0.0.1:{free_port()}/0", args)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in output
    assert PASSWORD not in output
    assert "cannot reach Redis" in done.stderr


@pytest.fixture
def frozen_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield server
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.cleanup()


def test_a_frozen_redis_ends_a_command_within_seconds(frozen_redis: RedisServer) -> None:
    """A Redis that accepts connections and never answers (stopped, a hung proxy): the
    command gives up by itself (about 6 s here) instead of hanging the on-call shell."""
    started = time.monotonic()
    done = run(frozen_redis.url, ["partitions"])
    assert time.monotonic() - started < 20
    assert done.returncode == 1, done.stderr
    assert "cannot reach Redis" in done.stderr
    assert "Traceback" not in done.stderr

"""The SRE's health view (README: `/health/ready`, `/health/detailed`) when the pod cannot do
its work although Redis answers: a CALLBACK_PARTITIONS that is not the installation's, and a
PostgreSQL that does not answer. Real api processes, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from services.cli.embedded import RedisServer, free_port
from services.cli.embedded_postgres import PostgresServer
from services.core import keys
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e


def children_of(parent: int) -> list[int]:
    """The processes whose parent is `parent` (from /proc: no procps on a slim machine)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def redis_not_started() -> Iterator[RedisServer]:
    server = RedisServer(port=free_port())  # its port is known; nothing listens there yet
    yield server
    server.cleanup()


def test_an_api_whose_partition_count_is_not_the_installation_s_is_not_ready(
    redis_not_started: RedisServer, tmp_path: Path
) -> None:
    """An api that could not reach Redis at its start checks the count later. It answered
    every send 503 `misconfigured` while `/health/ready` said 200 (the Service kept routing
    clients to it) and `/health/detailed` said `ok`, no word of the mismatch. Now the
    readiness probe finds it as soon as Redis answers: not ready, and the detailed view
    names both counts."""
    stack = new_stack(redis_not_started, tmp_path / "logs")
    try:
        api = stack.start_api()  # Redis away: its start check cannot run
        deadline = time.monotonic() + 15
        while True:
            stack.check_alive()
            try:
                if httpx.get(f"{api.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, api.output(600)
            time.sleep(0.05)
        redis_not_started.start()
        sync_redis.Redis(port=redis_not_started.port).set(keys.CALLBACK_PARTITION_COUNT, 16)
        deadline = time.monotonic() + 20
        while "misconfigured" not in (ready := httpx.get(f"{api.url}/health/ready")).text:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.1)
        assert ready.status_code == 503
        detailed = httpx.get(f"{api.url}/health/detailed", timeout=10)
        assert detailed.status_code == 503
        assert detailed.json()["components"]["callback_partitions"] == {
            "status": "mismatch",
            "configured": 8,
            "recorded": 16,
        }
        sent = httpx.post(
            f"{api.url}/api/chat/send", headers=auth(unique("t")),
            json={"message": "hi", "session_id": unique("s")}, timeout=10,
        )  # fmt: skip
        assert (sent.status_code, sent.json()["error"]["code"]) == (503, "misconfigured")
    finally:
        stack.stop()


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(durable=False).start()
    asyncio.run(migrate(server.url()))
    yield server
    server.cleanup()


def _freeze(server: PostgresServer, sig: signal.Signals) -> list[int]:
    """SIGSTOP/SIGCONT this test's own PostgreSQL: its postmaster and its children (each
    backend is a session of its own, so a process group does not hold them)."""
    master = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    pids = [master, *children_of(master)]
    for pid in pids:
        os.kill(pid, sig)
    return pids


def test_health_detailed_answers_soon_while_postgresql_is_frozen(
    e2e_redis: RedisServer, postgres: PostgresServer, tmp_path: Path
) -> None:
    """README: `/health/detailed` reports `database` `up`, `down` or `busy` ("said at once,
    not after the connect timeout"), "never a reason for 503"; the runbooks send the SRE
    there first (OrchestratorHighErrorRate, OrchestratorPersistenceWriteFailing).

    With PostgreSQL not answering (a frozen or partitioned server, a hung proxy: TCP up,
    nothing back), the view waits for the pooled connection's `SELECT 1` to hit
    `DATABASE_COMMAND_TIMEOUT_SECONDS` (30 s by default: 32 s measured; 8 s here) and then
    for the connect timeout (5 s) on every later call. A monitoring probe or an SRE's curl
    with a 10 s timeout gets no answer at all, so Redis's state, the workers and the queue
    lag are hidden exactly when they are needed, and the api looks down although only
    PostgreSQL is. Now the answer comes within a couple of seconds, `database` `down`."""
    stack = new_stack(
        e2e_redis, tmp_path / "logs", database_url=postgres.url(),
        database_command_timeout_seconds="8",
    )  # fmt: skip
    try:
        api = stack.start_api()
        stack.wait_ready(api)
        warm = httpx.get(f"{api.url}/health/detailed", timeout=10)
        assert warm.json()["components"]["database"]["status"] == "up", warm.text
        pids = _freeze(postgres, signal.SIGSTOP)
        try:
            started = time.monotonic()
            frozen = httpx.get(f"{api.url}/health/detailed", timeout=30)
            took = time.monotonic() - started
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert frozen.json()["components"]["database"]["status"] == "down", frozen.text
        # 10 s before (8 s of command timeout, then the connection's cleanup); 2 s now.
        assert took < 6, f"/health/detailed answered after {took:.1f} s: {frozen.text[:200]}"
    finally:
        stack.stop()

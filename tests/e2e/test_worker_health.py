"""/health/detailed's live workers after the last worker is killed: a worker silent for a
lease's ttl has lost its leases and is not counted by the workers themselves
(services/worker/leases.py `live_workers`); the health view must not report it alive longer."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import FAST_EXECUTOR, deploy, new_stack

pytestmark = pytest.mark.e2e

LEASE = 2.0


def test_killed_last_worker_leaves_health_view(e2e_redis: RedisServer, tmp_path: Path) -> None:
    stack = new_stack(e2e_redis, tmp_path / "logs", partition_lease_seconds=str(LEASE))
    try:
        api = stack.start_api()
        worker = stack.start("worker")
        stack.wait_ready(api)

        def alive() -> int:
            body = httpx.get(f"{api.url}/health/detailed", timeout=5).json()
            return int(body["components"]["workers"]["alive"])

        deadline = time.monotonic() + 20
        while alive() != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(LEASE / 3 + 0.2)  # a fresh heartbeat
        stack.stop_child(worker, signal.SIGKILL)
        killed = time.monotonic()
        bound = killed + LEASE + 1.0  # its leases are gone after LEASE; it is dead by then
        while time.monotonic() < bound:
            time.sleep(0.1)
        still = alive()
        assert still == 0, (
            f"/health/detailed still reports {still} live worker(s) "
            f"{time.monotonic() - killed:.1f} s after the only worker was SIGKILLed "
            f"(lease {LEASE} s)"
        )
    finally:
        stack.stop()


def test_health_says_how_long_the_oldest_unread_action_has_waited(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """The AES stopped (or saturated): `/health/detailed` showed a lag, the same for an AES
    that is slow as for one that is gone. It now says how long the oldest action no AES has
    read has been waiting, and it grows while nobody reads it."""
    with deploy(own_redis, tmp_path / "logs", **FAST_EXECUTOR) as deployed:
        api = deployed.api
        executor = next(c for c in deployed.stack.children if c.role == "executor")
        deployed.stack.stop_child(executor)
        tenant = unique("t")
        sent = httpx.post(
            f"{api.url}/api/chat/send", json={"message": "anyone?"}, headers=auth(tenant)
        )
        assert sent.status_code == 202, sent.text

        def waiting() -> dict[str, object]:
            queues = httpx.get(f"{api.url}/health/detailed", timeout=5).json()["components"]
            return {
                where: state
                for where, state in queues["queues"].items()
                if where.startswith("{aes}:actions:") and state.get("lag")
            }

        first = waiting()
        time.sleep(0.5)  # the age is the point: it must grow with time
        later = waiting()
    ((where, state),) = first.items()
    assert where.endswith("/aes"), first
    assert isinstance(state["oldest_waiting_seconds"], float), state
    assert later[where]["oldest_waiting_seconds"] >= state["oldest_waiting_seconds"] + 0.4, (
        first,
        later,
    )

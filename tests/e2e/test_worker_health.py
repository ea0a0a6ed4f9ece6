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
from tests.e2e.conftest import new_stack

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

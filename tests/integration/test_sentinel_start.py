"""An api started while its sentinels are unreachable (a pod scheduled during a Redis restart)
must come up like one started while a standalone Redis is unreachable
(tests/e2e/test_api_start_without_redis.py: alive, /health 200 within 15 s, not ready).
Behind unreachable sentinels /health first answered after more than a minute (80 s measured),
beyond the chart's startup probe (2 s x 30): the pod was restarted in a loop. redis-py's
default backoff per sentinel made every command wait 33 s."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from services.cli.embedded import free_port
from tests.integration.start_checks import ROOT, base_env, start

BOUND_SECONDS = 20.0


def test_an_api_behind_unreachable_sentinels_is_alive_soon(tmp_path: Path) -> None:
    sentinels = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    env = base_env(None, redis_mode="sentinel", redis_sentinels=sentinels)
    port = free_port()
    log = tmp_path / "api.log"
    process = start(["api", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        started = time.monotonic()
        alive_after = None
        while time.monotonic() - started < BOUND_SECONDS and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        alive_after = time.monotonic() - started
                        break
            except OSError:
                time.sleep(0.1)
        assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()[-1500:]}"
        assert alive_after is not None, (
            f"/health did not answer within {BOUND_SECONDS} s with sentinels {sentinels} "
            f"unreachable; output so far:\n{log.read_text()[-1500:]}"
        )
    finally:
        process.kill()
        process.wait()


def test_unreachable_sentinels_are_named_by_their_address_in_one_short_line() -> None:
    """redis-py names each sentinel it could not ask by its client's repr: three of them made
    `orchestrator tenants list` print one 3 200-character line (and each service logged one
    a retry), the addresses buried in connection-pool internals."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    env = base_env(None, redis_mode="sentinel", redis_sentinels=",".join(addresses))
    done = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "tenants", "list"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert len(lines[0]) < 300, lines[0]
    assert all(f"{address} - " in lines[0] for address in addresses), lines[0]

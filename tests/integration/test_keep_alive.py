"""uvicorn's keep-alive at 75 s (services/cli/serve_api.py) on a real api process: what idle
kept-alive HTTP connections cost, and whether a SIGTERM (drain, then uvicorn's shutdown)
waits for them (SIGTERM closes them at once, after the drain)."""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.embedded import RedisServer
from tests.e2e.conftest import lone_api, proc_kb

CONNECTIONS = 200
DRAIN_SECONDS = 1.0


@pytest.fixture
def redis_server_e2e() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


def idle_connection(port: int) -> socket.socket:
    """A connection that made one request (no token), read its answer and stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: api\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        assert chunk, answer
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return sock


def test_sigterm_closes_idle_kept_alive_connections_at_once(
    redis_server_e2e: RedisServer, tmp_path: Path
) -> None:
    """200 idle connections: the api's memory per connection is small, and a SIGTERM ends
    the process within the drain window plus a few seconds, every connection closed (none
    held until the 75 s keep-alive runs out)."""
    with lone_api(redis_server_e2e, tmp_path, drain_seconds=str(DRAIN_SECONDS)) as api:
        assert api.port is not None
        pid = api.process.pid
        before = proc_kb(pid)
        socks = [idle_connection(api.port) for _ in range(CONNECTIONS)]
        try:
            grown = proc_kb(pid) - before
            assert grown / CONNECTIONS < 64, f"{grown} kB for {CONNECTIONS} idle connections"
            assert len(os.listdir(f"/proc/{pid}/fd")) >= CONNECTIONS
            started = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            api.process.wait(timeout=DRAIN_SECONDS + 10)
            took = time.monotonic() - started
            open_left = 0
            for sock in socks:
                ready, _, _ = select.select([sock], [], [], 0.5)
                if not ready or sock.recv(1) != b"":
                    open_left += 1
            assert open_left == 0
            assert took < DRAIN_SECONDS + 6, took
        finally:
            for sock in socks:
                sock.close()

"""A fault-injecting TCP proxy process between the product's processes and Redis/PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.embedded import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.port, self.control_port = free_port(), free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.redis_proxy", str(self.port), upstream_host,
             str(upstream_port), str(self.control_port)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def command(self, line: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.control_port)
        writer.write(line.encode() + b"\n")
        await writer.drain()
        answer = (await reader.readline()).decode().split()
        writer.close()
        assert answer[0] == "ok", answer
        return int(answer[1])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer(port=free_port()).start()
    yield server
    if server.process is not None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.cleanup()


@pytest.fixture
def redis_proxy(own_redis: RedisServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy("127.0.0.1", own_redis.port)
    yield proxy
    proxy.stop()

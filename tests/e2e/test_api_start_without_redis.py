"""An api process started while Redis is unreachable (a pod scheduled during a Redis restart).

README, Redis faults: "while Redis is unreachable REST answers 503 `unavailable`, readiness
fails, ...; every process reconnects with backoff by itself". The worker does (it logs and
retries); the api must too: alive, not ready, then ready once Redis answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer, free_port
from services.cli.stack import LocalStack
from tests.e2e.clients import connect, unique
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e


@pytest.fixture
def redis_not_started() -> Iterator[RedisServer]:
    server = RedisServer(port=free_port())  # its port is known; nothing listens there yet
    yield server
    server.cleanup()


async def test_an_api_started_while_redis_is_unreachable_waits_for_it(
    redis_not_started: RedisServer, tmp_path: Path
) -> None:
    stack: LocalStack = new_stack(redis_not_started, tmp_path / "logs")
    try:
        api = stack.start_api()
        async with httpx.AsyncClient(base_url=api.url, timeout=2) as http:
            async with asyncio.timeout(15):
                while True:  # the process comes up (or dies)
                    assert api.alive(), (
                        f"the api exited with {api.process.returncode} because Redis was "
                        f"unreachable at start:\n{api.output(600)}"
                    )
                    try:
                        live = await http.get("/health")
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
            assert live.status_code == 200
            assert (await http.get("/health/ready")).status_code == 503

            redis_not_started.start()
            async with asyncio.timeout(20):
                while (await http.get("/health/ready")).status_code != 200:
                    assert api.alive()
                    await asyncio.sleep(0.1)
        ws, ack = await connect(api.ws_url, unique("t"), unique("s"))
        assert ack["type"] == "connection.ack"
        await ws.close()
    finally:
        stack.stop()

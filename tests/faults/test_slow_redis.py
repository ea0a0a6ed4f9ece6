"""Redis slow, not down: one big command stalling it for seconds (DEBUG SLEEP), or every
round trip taking 1.4 s (the fault proxy). Found by the review of slow dependencies."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.cli.embedded import RedisServer, free_port
from tests.e2e.clients import auth, connect, next_event, unique
from tests.e2e.conftest import deploy, new_stack
from tests.faults.conftest import FaultProxy

pytestmark = pytest.mark.e2e

LATENCY_MS = 700  # each way: 1.4 s a round trip, within the 3 s command timeout


@pytest.fixture
def debug_redis() -> Iterator[RedisServer]:
    """A Valkey of the test's own that accepts DEBUG SLEEP (a big command stalling it)."""
    server = RedisServer(port=free_port(), extra_args=("--enable-debug-command", "yes")).start()
    yield server
    server.cleanup()


@pytest.fixture
def slow_redis() -> Iterator[tuple[RedisServer, FaultProxy]]:
    server = RedisServer(port=free_port()).start()
    proxy = FaultProxy("127.0.0.1", server.port)
    yield server, proxy
    proxy.stop()
    server.cleanup()


async def stall(url: str, seconds: float) -> None:
    """Valkey busy with one command for `seconds` (as a big KEYS or a Lua loop would be)."""
    client = Redis.from_url(url, socket_timeout=seconds + 10)
    try:
        await client.execute_command("DEBUG", "SLEEP", str(seconds))
    finally:
        await client.aclose()


async def stalled(url: str) -> None:
    """Returns once Valkey does not answer a PING within 0.2 s (it is in the big command)."""
    probe = Redis.from_url(url, socket_timeout=0.2)
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    await probe.ping()
                except RedisTimeoutError:
                    return
                await asyncio.sleep(0.01)
    finally:
        with contextlib.suppress(Exception):
            await probe.aclose()


async def answers(ws: Any, quiet_seconds: float) -> list[dict[str, Any]]:
    """The final events the socket gets until it stays quiet for `quiet_seconds`."""
    finals = []
    with contextlib.suppress(TimeoutError):
        while True:
            event = await next_event(ws, timeout=quiet_seconds)
            if event["type"] in ("chat.response", "chat.error"):
                finals.append(event)
    return finals


@pytest.mark.parametrize("stall_seconds", [5, 8])
async def test_a_send_that_meets_a_busy_redis_is_answered_once_and_told_truly(
    debug_redis: RedisServer, tmp_path: Path, stall_seconds: int
) -> None:
    """A send whose script timed out (Valkey busy beyond the 3 s socket timeout) was answered
    503 "retry later", yet the script ran when Valkey came back: the message was answered, and
    a client retrying as told got it answered (and billed) twice. The api sends the script
    again (same task id: `exists` if the first ran): busy 5 s, the send is accepted once;
    busy 8 s (both attempts time out) the 503 names the task the message may still become."""
    with deploy(debug_redis, tmp_path / "logs", executor_chunk_delay_ms="2") as deployed:
        api = deployed.api
        tenant, session = unique("t"), unique("s")
        ws, _ = await connect(api.ws_url, tenant, session)
        busy = asyncio.create_task(stall(debug_redis.url, stall_seconds))
        await stalled(debug_redis.url)
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.post(
                f"{api.url}/api/chat/send",
                json={"message": "only once please", "session_id": session},
                headers=auth(tenant),
            )
            await busy
            finals = await answers(ws, quiet_seconds=5)
            if stall_seconds == 5:
                assert reply.status_code == 202, reply.text
                task_id = reply.json()["task_id"]
            else:
                assert reply.status_code == 503, reply.text
                error = reply.json()["error"]
                task_id = error["details"]["task_id"]
                assert task_id in error["message"], error
                state = await http.get(f"{api.url}/api/chat/tasks/{task_id}", headers=auth(tenant))
                assert state.status_code == 200, state.text  # it was queued: the client can tell
        await ws.close()
        assert [e.get("task_id") for e in finals] == [task_id], finals


async def test_health_detailed_answers_in_about_a_round_trip_when_redis_is_slow(
    slow_redis: tuple[RedisServer, FaultProxy], tmp_path: Path
) -> None:
    """With every round trip at 1.4 s, /health/detailed ran ~15 of them one after the other
    (PING, the probe SET, CONFIG GET, ZRANGEBYSCORE, one XINFO GROUPS per stream, the
    backlog): 21 s, past any monitoring probe's timeout, which then reported the api itself
    as unreachable. /health/ready answers in one round trip."""
    server, proxy = slow_redis
    stack = new_stack(server, tmp_path / "logs")
    try:
        api = stack.start_api(redis_url=proxy.redis_url)
        stack.start("worker")
        stack.wait_ready(api)
        async with httpx.AsyncClient(timeout=40) as http:
            warm = await http.get(f"{api.url}/health/detailed")  # the pool's connections made
            assert warm.status_code == 200, warm.text
            await proxy.command(f"latency {LATENCY_MS}")
            started = time.monotonic()
            detailed = await http.get(f"{api.url}/health/detailed")
            took = time.monotonic() - started
        assert detailed.json()["components"]["redis"]["status"] == "up"
        # One round trip is 1.4 s; four leave room for a connection made on the way.
        assert took < 4 * 2 * LATENCY_MS / 1000, f"/health/detailed took {took:.1f} s"
    finally:
        stack.stop()

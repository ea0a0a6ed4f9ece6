"""The worker's Redis connections slowed down (every chunk delayed 300 ms each way: a
congested or far-away Redis), while clients chat through an api on a healthy Redis."""

from __future__ import annotations

import asyncio
import json
import time
from itertools import pairwise
from pathlib import Path

import pytest

from services.cli.embedded import RedisServer
from tests.e2e.clients import connect, next_event, unique
from tests.e2e.conftest import new_stack
from tests.faults.conftest import FaultProxy

pytestmark = pytest.mark.e2e

LATENCY_MS = 300
CHAT_SECONDS = 28.0
GIVE_UP_SECONDS = 15.0  # a socket silent this long is recorded as such, not waited for
# With 0.6 s per round trip an answer's events come a round trip or two apart; a socket that
# hears nothing for 8 s is stalled.
MAX_SILENCE_SECONDS = 8.0


async def _chat(ws_url: str, tenant: str, until: float) -> list[tuple[float, str]]:
    """Send streaming messages one after the other until `until`; (time, type) of each event."""
    ws, _ = await connect(ws_url, tenant, unique("s"))
    seen: list[tuple[float, str]] = []
    try:
        n = 0
        while time.monotonic() < until:
            n += 1
            send = {"type": "chat.send", "data": {"message": f"m{n}", "stream": True}}
            await ws.send(json.dumps(send))
            while True:
                try:
                    event = await next_event(ws, timeout=GIVE_UP_SECONDS)
                except TimeoutError:
                    seen.append((time.monotonic(), "nothing"))
                    return seen
                seen.append((time.monotonic(), event["type"]))
                if event["type"] in ("chat.response", "chat.error", "chat.cancelled"):
                    break
    finally:
        await ws.close()
    return seen


async def test_a_lone_worker_keeps_its_partitions_and_delivers_when_redis_is_300ms_away(
    own_redis: RedisServer, redis_proxy: FaultProxy, tmp_path: Path
) -> None:
    """README: a partition lease (ORCHESTRATOR_PARTITION_LEASE_SECONDS, 10 s) is renewed
    by its holder; only a dead worker's partitions wait for it to expire. The worker renewed
    in `Worker.run`'s loop after `_sample_lag` too (one XINFO GROUPS per owned callback
    stream and per AES stream, 11 sequential round trips), then paused lease/3: at 0.6 s per
    round trip a loop took more than the lease, the only worker lost every partition it held,
    and every socket heard nothing for about 20 s although Redis answered every command."""
    stack = new_stack(own_redis, tmp_path / "logs", executor_chunk_delay_ms="30")
    try:
        api = stack.start_api()
        worker = stack.start("worker", redis_url=redis_proxy.redis_url)
        stack.start("executor")
        stack.wait_ready(api)
        tenant = unique("t")
        await redis_proxy.command(f"latency {LATENCY_MS}")
        started = time.monotonic()
        sessions = await asyncio.gather(
            *(_chat(api.ws_url, tenant, started + CHAT_SECONDS) for _ in range(3))
        )
        silences = []
        for seen in sessions:
            times = [started] + [t for t, _ in seen]
            gap, at = max((b - a, a - started) for a, b in pairwise(times))
            silences.append((round(gap, 1), round(at, 1)))
        lost = [line for line in worker.output(100_000).splitlines() if "lost partition" in line]
        assert max(gap for gap, _ in silences) < MAX_SILENCE_SECONDS, (
            f"sockets silent for (seconds, starting at): {silences}; the only worker "
            f"{len(lost)} times: {lost[:2]}"
        )
    finally:
        await redis_proxy.command("pass")
        stack.stop()

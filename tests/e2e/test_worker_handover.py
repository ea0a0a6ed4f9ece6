"""A worker scaled in with SIGTERM gives its partitions back "so another worker takes over at
once" (services/worker/main.py, leases.py `leave`): a session streaming through one of them
must not freeze for seconds."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core import keys
from tests.e2e.clients import connect, final_of, next_event, send, unique
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e

P = 8
# Chunks come every 20 ms; the old hand-over froze them ~6 s (a third of a lease, then a 3 s
# grace); a clean one takes about a second, leaving room for a loaded machine.
MAX_GAP_SECONDS = 3.0


async def _owner(redis: Redis, partition: int) -> str | None:
    value = await redis.get(keys.partition_lease(partition))
    return value.decode() if value else None


async def _wait(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.05)


def test_a_clean_sigterm_handover_does_not_freeze_the_partition_s_sessions(
    e2e_redis: RedisServer, tmp_path: Path
) -> None:
    """The partition was taken at the other worker's next round (up to a third of a lease)
    and then waited out a takeover grace meant for an expired lease: a clean scale-in froze
    its streams ~6 s. Its departure is watched for, and a cleanly released lease has no grace."""
    stack = new_stack(e2e_redis, tmp_path / "logs", callback_partitions=str(P))
    try:
        api = stack.start_api()
        stack.start("executor")
        a = stack.start("worker")
        stack.wait_ready(api)

        async def run() -> float:
            redis = Redis.from_url(e2e_redis.url)
            a_id = f"{socket.gethostname()}-{a.process.pid}"

            async def a_holds_all() -> bool:
                return all([await _owner(redis, p) == a_id for p in range(P)])

            await _wait(a_holds_all)
            b = stack.start("worker")
            b_id = f"{socket.gethostname()}-{b.process.pid}"

            async def balanced() -> bool:
                owners = [await _owner(redis, p) for p in range(P)]
                return owners.count(b_id) == P // 2 and owners.count(a_id) == P // 2

            await _wait(balanced, 30)
            owners = [await _owner(redis, p) for p in range(P)]
            # a session whose partition worker B holds
            while True:
                tenant, session = unique("t"), unique("s")
                if owners[keys.partition_of(tenant, session, P)] == b_id:
                    break
            ws, _ = await connect(api.ws_url, tenant, session)
            async with httpx.AsyncClient() as http:
                reply = await send(
                    http,
                    api.url,
                    tenant,
                    {
                        "message": "tell me a long story",
                        "stream": True,
                        "session_id": session,
                        "context": {"simulate": {"repeat": 40, "chunk_delay_ms": 20}},
                    },
                )
                assert reply.status_code in (200, 202), reply.text
                task_id = reply.json()["task_id"]
            arrivals: list[float] = []
            done = final_of(task_id)
            terminated = False
            async with asyncio.timeout(60):
                while True:
                    event = await next_event(ws, 30)
                    arrivals.append(time.monotonic())
                    if event["type"] == "chat.chunk" and not terminated and len(arrivals) > 20:
                        b.process.send_signal(signal.SIGTERM)  # Kubernetes scales in
                        terminated = True
                    if done(event):
                        break
            await ws.close()
            await redis.aclose()
            assert terminated
            assert b.process.wait(15) == 0
            gaps = [y - x for x, y in itertools.pairwise(arrivals)]
            return max(gaps)

        worst = asyncio.run(run())
        assert worst < MAX_GAP_SECONDS, (
            f"the stream froze {worst:.2f} s while its partition moved from a worker that "
            "gave it back cleanly (SIGTERM)"
        )
    finally:
        stack.stop()

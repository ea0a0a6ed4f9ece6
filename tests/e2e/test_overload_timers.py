"""The partition timers (`{cb:N}:retries`, `{cb:N}:deadlines`) under a flood of due entries."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core import keys
from tests.e2e.clients import unique
from tests.e2e.overload import saturated_stack, send_many, set_tier, task_hash

pytestmark = pytest.mark.e2e


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process so far: a worker far from a full core while retries wait is held
    back by its timer loop, not by the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


async def _overdue(redis: Redis, zset: str) -> float:
    """How long the oldest member of `zset` has been due (0 when none is), on Redis's clock."""
    oldest = await redis.zrange(zset, 0, 0, withscores=True)
    if not oldest:
        return 0.0
    seconds, micros = await redis.time()
    return max(0.0, seconds + micros / 1e6 - float(oldest[0][1]))


async def test_retries_of_one_session_are_dispatched_when_due(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """A burst of messages whose first three attempts fail (an AES shedding load answers
    `execution.failed` retryable): every retry is due 50-100 ms after its failure. The worker
    fired at most 100 per partition per 0.2 s tick, one member at a time with several round
    trips each, then slept the full tick however many were still due: retries went out
    2.6-3.6 s late (up to ~750 waiting) with the worker at 30% of a core. Now a batch is
    handed out 20 at a time and a full batch is followed at once by the next: 0.4-0.5 s at
    worst here (the bound, 1.5 s, leaves room for a busier machine)."""
    redis = Redis.from_url(own_redis.url)
    tenant, session = unique("t"), unique("s")
    try:
        with saturated_stack(
            own_redis,
            tmp_path / "logs",
            slots=64,
            executor_chunk_delay_ms="0",
            max_task_attempts="4",
        ) as stack:
            await set_tier(redis, tenant, "enterprise", 30)
            retries = keys.partition_retries(keys.partition_of(tenant, session, 8))
            worst = 0.0
            most = 0
            sending = True

            async def watch() -> None:
                nonlocal worst, most
                while sending or await redis.zcard(retries):
                    worst = max(worst, await _overdue(redis, retries))
                    most = max(most, await redis.zcard(retries))
                    await asyncio.sleep(0.05)

            watcher = asyncio.create_task(watch())
            worker = next(c for c in stack.stack.children if c.role == "worker")
            cpu_before, started = _cpu_seconds(worker.process.pid), time.monotonic()
            body = {
                "message": "x",
                "session_id": session,
                "context": {"simulate": {"fail_attempts": 3, "retryable": True}},
            }
            replies = await send_many(stack.api.url, tenant, [body] * 1200, parallel=24)
            sending = False
            assert all(r.status_code == 202 for r in replies), replies[-1].text
            await asyncio.wait_for(watcher, 60)
            busy = (_cpu_seconds(worker.process.pid) - cpu_before) / (time.monotonic() - started)
            last = replies[-1].json()["task_id"]
            state = await task_hash(redis, tenant, session, last)
            assert worst < 1.5, (
                f"a retry waited {worst:.1f} s past its due time (last task: "
                f"{state.get('status')}, attempt {state.get('attempt')}; "
                f"up to {most} retries waiting; the worker used {busy:.0%} of a core)"
            )
    finally:
        await redis.aclose()

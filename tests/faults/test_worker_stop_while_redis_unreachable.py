"""A worker told to stop (SIGTERM: a rollout, a node drain) while its Redis is unreachable."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, new_stack
from tests.faults.conftest import FaultProxy

pytestmark = pytest.mark.e2e

# charts/agent-orchestrator/values.yaml: worker.terminationGracePeriodSeconds
GRACE_SECONDS = 30.0


async def test_a_worker_stops_within_its_grace_period_while_redis_is_unreachable(
    own_redis: RedisServer, redis_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Every Redis wait of the worker is bounded by `socket_timeout` (WORKER_SLEEP_SECONDS +
    2 s = 3 s here), so a stop should take a few of them. But `Worker.run` stopped its partition
    consumers one after the other (`for partition in ...: await self._stop_consumer(...)`):
    while the first finishes its timed-out round trip, the seven others, not told to stop
    yet, started new ones, and each waited its own timeout in turn. With the default 8
    partitions the worker needed about 40 s to exit (52 s with PostgreSQL away too): past the
    chart's terminationGracePeriodSeconds (30 s), so Kubernetes SIGKILLed it, and every
    rollout or node drain during a Redis outage ended in exit code 137."""
    stack = new_stack(own_redis, tmp_path / "logs", **FAST_EXECUTOR)
    try:
        api = stack.start_api()
        worker = stack.start("worker", redis_url=redis_proxy.redis_url)
        stack.start("executor")
        stack.wait_ready(api)
        tenant, session = unique("t"), unique("s")
        ws, _ = await connect(api.ws_url, tenant, session)
        async with httpx.AsyncClient() as http:  # the worker holds every partition
            reply = await send(http, api.url, tenant, {"message": "hi", "session_id": session})
            await events_until(ws, final_of(reply.json()["task_id"]))
        await ws.close()

        assert await redis_proxy.command("silent_all") > 0  # a partition: nothing answers
        worker.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = await asyncio.to_thread(worker.process.wait, GRACE_SECONDS)
        except Exception:  # subprocess.TimeoutExpired
            code = None
        took = time.monotonic() - started
        assert code == 0, (
            f"worker still running {took:.0f} s after SIGTERM (exit code {code}); Kubernetes "
            f"would SIGKILL it now:\n{worker.output(1500)}"
        )
    finally:
        await redis_proxy.command("pass")
        stack.stop()

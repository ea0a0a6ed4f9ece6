"""The worker's stream lag and pending gauges while it cannot reach Redis: nobody knows the lag
then, so the series go (a gap on the panels and for `OrchestratorStreamLag`) instead of the
last sample staying exported, "0 behind", as a healthy idle deployment says."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.conftest import deploy
from tests.e2e.test_metrics import scrape

pytestmark = pytest.mark.e2e

WAIT_SECONDS = 20.0
GAUGES = ("orchestrator_stream_lag", "orchestrator_stream_pending")


def gauge_series(port: int | None) -> int:
    return sum(1 for name, _ in scrape(port) if name in GAUGES)


async def until_series(port: int | None, present: bool) -> None:
    async with asyncio.timeout(WAIT_SECONDS):
        while (gauge_series(port) > 0) != present:
            await asyncio.sleep(0.1)  # a gauge sampled on the worker's own clock: polled


async def test_lag_series_go_while_redis_is_unreachable(tmp_path: Path) -> None:
    redis = RedisServer().start()  # its own: this test stops it
    try:
        with deploy(redis, tmp_path / "logs", partition_lease_seconds="1.5") as deployed:
            (worker,) = [c for c in deployed.stack.children if c.role == "worker"]
            tenant, session = unique("t"), unique("s")
            ws, _ = await connect(deployed.api.ws_url, tenant, session)
            async with httpx.AsyncClient() as http:
                sent = await send(
                    http, deployed.api.url, tenant, {"message": "hi", "session_id": session}
                )
            await events_until(ws, final_of(sent.json()["task_id"]))
            await ws.close()
            await until_series(worker.metrics_port, present=True)
            redis.stop()
            await until_series(worker.metrics_port, present=False)
    finally:
        redis.cleanup()

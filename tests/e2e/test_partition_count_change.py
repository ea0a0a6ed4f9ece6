"""README "Changing CALLBACK_PARTITIONS", step by step, on real processes: an installation
answering with 8 partitions; its apis and workers stopped with nothing in flight;
`orchestrator partitions set 3`; everything started with 3 answers again, on a session whose
partition is not the same under both counts; a worker left with 8 refuses to start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core import keys
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, new_stack
from tests.integration.start_checks import ROOT, assert_refused_at_start, base_env, run_role

pytestmark = pytest.mark.e2e


def partitions_command(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "partitions", *args],
        env=base_env(redis_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def answered(redis_server: RedisServer, logs: Path, partitions: str, session: str) -> str:
    """One message sent and answered on an installation running with `partitions`."""
    stack = new_stack(redis_server, logs, callback_partitions=partitions, **FAST_EXECUTOR)
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        ws, _ = await connect(api.ws_url, "acme", session)
        async with httpx.AsyncClient() as http:
            reply = await send(http, api.url, "acme", {"message": "hi", "session_id": session})
        assert reply.status_code == 202, reply.text
        task_id: str = reply.json()["task_id"]
        events = await events_until(ws, final_of(task_id), 30)
        await ws.close()
        assert events[-1]["type"] == "chat.response", events
        return task_id
    finally:
        stack.stop()


async def test_the_documented_change_keeps_the_installation_answering(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    session = unique("s")
    while keys.partition_of("acme", session, 8) < 3:  # unread by workers of 3 if misrouted
        session = unique("s")
    await answered(redis_server, tmp_path / "before", "8", session)

    shown = partitions_command(redis_server.url)
    assert shown.returncode == 0, shown.stderr
    held = json.loads(shown.stdout)
    assert held["recorded"] == 8
    in_flight = ("tasks_in_flight", "retries_waiting", "callbacks_unapplied")
    assert [held[name] for name in in_flight] == [0, 0, 0], held
    changed = partitions_command(redis_server.url, "set", "3")
    assert changed.returncode == 0, changed.stderr

    await answered(redis_server, tmp_path / "after", "3", session)
    left_behind, _ = run_role(
        "worker", base_env(redis_server.url, callback_partitions="8"), tmp_path / "old.log"
    )
    assert_refused_at_start(left_behind, "ORCHESTRATOR_CALLBACK_PARTITIONS")

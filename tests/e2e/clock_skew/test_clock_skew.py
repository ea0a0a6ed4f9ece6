"""Pods whose wall clocks disagree by a minute or two (no NTP requirement is documented)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.stack import LocalStack
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.clock_skew.helpers import start_skewed
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e

# Ahead of the api's clock by more than the free tier's 60 s task timeout.
WORKER_AHEAD_SECONDS = 90


@pytest.fixture(scope="module")
def skewed_worker_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, str]]:
    stack = new_stack(redis_server, tmp_path_factory.mktemp("logs"), default_tier="free")
    try:
        api = stack.start_api()
        start_skewed(stack, "worker", WORKER_AHEAD_SECONDS)
        stack.start("executor")
        stack.wait_ready(api)
        yield stack, api.url
    finally:
        stack.stop()


async def test_task_is_not_timed_out_early_by_a_worker_whose_clock_runs_ahead(
    skewed_worker_stack: tuple[LocalStack, str],
) -> None:
    """The api sets the deadline (its clock + 60 s), the worker fires it on *its* clock:
    a worker 90 s ahead times out every task at its first tick, although the AES answers
    in 1 s. Rate limits and dispatch use Redis's TIME precisely to avoid this."""
    _, base = skewed_worker_stack
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(base.replace("http", "ws", 1), tenant, session)
    try:
        async with httpx.AsyncClient() as http:
            reply = await send(
                http,
                base,
                tenant,
                {
                    "message": "answer me in a second",
                    "session_id": session,
                    "context": {"simulate": {"delay_ms": 1000}},
                },
            )
            assert reply.status_code == 202, reply.text
            task_id = reply.json()["task_id"]
            events = await events_until(ws, final_of(task_id), timeout=30)
    finally:
        await ws.close()
    final = events[-1]
    assert final["type"] == "chat.response", (
        f"a 1 s answer within a 60 s timeout ended as {final['type']}: {final.get('data')}"
    )

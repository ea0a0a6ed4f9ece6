"""taskTimeoutSeconds overridden for a tenant ends its slow tasks at the new deadline (real api,
worker and a slow reference executor)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import auth, connect, events_until, final_of, unique
from tests.e2e.conftest import Deployment, deploy, redis_client

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, Deployment]]:
    server = RedisServer().start()
    try:
        with deploy(
            server, tmp_path_factory.mktemp("logs"), default_tier="pro",

        ) as deployed:  # fmt: skip
            yield server, deployed
    finally:
        server.cleanup()


async def test_a_task_timeout_override_ends_a_slow_task_at_its_new_deadline(
    slow: tuple[RedisServer, Deployment],
) -> None:
    """Guard: pro allows 120 s; with `taskTimeoutSeconds=1` a task the executor needs 6 s
    for ends about a second after it was accepted (not after 120 s), with a final event."""
    server, deployed = slow
    redis = redis_client(server)
    try:
        tenant, session = unique("t"), unique("s")
        await QuotaStore(redis, load_settings()).set(tenant, "pro", {"taskTimeoutSeconds": 1})
        ws, _ = await connect(deployed.api.ws_url, tenant, session)
        async with httpx.AsyncClient(base_url=deployed.api.url, timeout=10) as http:
            reply = await http.post(
                "/api/chat/send",
                json={
                    "message": "hi",
                    "session_id": session,
                    "context": {"simulate": {"delay_ms": 6000}},
                },
                headers=auth(tenant),
            )
        assert reply.status_code == 202, reply.text
        accepted = time.monotonic()
        events = await events_until(ws, final_of(reply.json()["task_id"]), timeout=15)
        took = time.monotonic() - accepted
        final = events[-1]
        # Ended by its 1 s deadline: without the override (pro: 120 s) the executor's answer
        # after 6 s would have been the final event.
        assert final["type"] == "chat.error", (round(took, 2), [e["type"] for e in events], final)
        assert final["data"]["code"] == "timed_out", final
        await ws.close()
    finally:
        await redis.aclose()

"""What the two versions exchange besides task states: the scripts in Valkey's cache (each
version's own bodies, flushed mid-mix), an AES's `websocket.send` with and without
`trace_context` through a traced new worker to sockets on both apis, and `/health/detailed`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from services.cli.otlp_sink import Receiver
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.conftest import redis_client
from tests.e2e.test_tracing_cases import _chat_process, wait_for
from tests.upgrade.conftest import Mixed

pytestmark = pytest.mark.e2e

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def carrying(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event["type"] == "message" and event["data"] == {"n": n}


@pytest.fixture
def traced_worker(mixed: Mixed) -> Iterator[Receiver]:
    """The new worker and executor, the worker exporting spans (so it prefixes a traced
    `websocket.send`'s frame with its traceparent)."""
    receiver = Receiver().start()
    mixed.use(worker="old", executor="new")  # (any other worker first: replaced below)
    version, worker = mixed.running.pop("worker")
    mixed.stack(version).stop_child(worker)
    mixed.new.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    try:
        mixed.running["worker"] = ("new", mixed.new.start("worker"))
    finally:
        del mixed.new.env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    yield receiver
    mixed.new.stop_child(mixed.running.pop("worker")[1])
    receiver.stop()


async def test_aes_sends_with_and_without_trace_context_reach_sockets_of_both_apis(
    mixed: Mixed, traced_worker: Receiver
) -> None:
    """Each send reaches a socket on the old and on the new api as the same valid frame."""
    tenant, session = unique("t"), unique("s")
    sockets = [(await connect(at.ws_url, tenant, session))[0]
               for at in (mixed.old_api, mixed.new_api)]  # fmt: skip
    redis = redis_client(mixed.redis)
    async with httpx.AsyncClient(timeout=10) as http:
        stalled = await send(
            http, mixed.new_api.url, tenant,
            {"message": "x", "session_id": session, "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
    action = await _chat_process(redis, stalled.json()["task_id"])
    for n, carrier in enumerate(({"traceparent": TRACEPARENT}, {})):
        body: dict[str, Any] = {
            "action_type": "websocket.send",
            "tenant_id": tenant,
            "session_id": session,
            "task_id": action["task_id"],
            "trace_context": carrier,
            "message": {"n": n},
        }
        await redis.xadd(action["callback_queue"], {"action": json.dumps(body)})
        for ws in sockets:
            (*_, frame) = await events_until(ws, carrying(n))
            assert frame["task_id"] == action["task_id"], frame
    await redis.aclose()
    for ws in sockets:
        await ws.close()
    # The traced one really went out prefixed: the worker made its span.
    spans = await wait_for(
        traced_worker,
        lambda spans: any(
            s.attributes.get("orchestrator.action_type") == "websocket.send" for s in spans
        ),
    )
    assert spans


@pytest.mark.parametrize("worker", ["old", "new"])
async def test_sends_through_both_apis_after_the_script_cache_is_flushed(
    mixed: Mixed, worker: str
) -> None:
    """SCRIPT FLUSH (a Valkey restarted without its cache) with both versions running: each
    reloads its own bodies on NOSCRIPT; sends through either api are answered."""
    mixed.use(worker=worker, executor=worker)
    redis = redis_client(mixed.redis)
    async with httpx.AsyncClient(timeout=10) as http:
        for at in (mixed.old_api, mixed.new_api):
            tenant, session = unique("t"), unique("s")
            ws, _ = await connect(at.ws_url, tenant, session)
            await redis.script_flush()
            sent = await send(http, at.url, tenant,
                              {"message": "m", "session_id": session, "stream": True})  # fmt: skip
            assert sent.status_code == 202, sent.text
            events = await events_until(ws, final_of(sent.json()["task_id"]))
            assert events[-1]["type"] == "chat.response", events
            await ws.close()
            health = await http.get(f"{at.url}/health/detailed")
            assert health.status_code == 200, health.text
            assert health.json()["components"]["workers"]["alive"] == 1, health.text
    await redis.aclose()

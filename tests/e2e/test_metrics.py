"""After a known set of chats, every process's /metrics shows exactly what happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int | None) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= set(got))


@pytest.fixture(scope="module")
def metered(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, Child, Child, Child]]:
    stack = new_stack(e2e_redis, tmp_path_factory.mktemp("logs"), executor_chunk_delay_ms="1")
    try:
        api = stack.start_api()
        worker = stack.start("worker")
        executor = stack.start("executor")
        stack.wait_ready(api)
        yield stack, api, worker, executor
    finally:
        stack.stop()


async def test_each_process_counts_the_chats_it_handled(
    metered: tuple[LocalStack, Child, Child, Child],
) -> None:
    _, api, worker, executor = metered
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        for stream in (True, True, False):
            reply = await send(
                http,
                api.url,
                tenant,
                {"message": "count me", "stream": stream, "session_id": session},
            )
            await events_until(ws, final_of(reply.json()["task_id"]))
    api_metrics = scrape(api.metrics_port)
    assert total(api_metrics, "orchestrator_tasks_total", status="accepted", tier="enterprise") == 3
    assert total(api_metrics, "orchestrator_websocket_connections") == 1
    assert (
        total(api_metrics, "orchestrator_http_requests_total", path="/api/chat/send", method="POST")
        == 3
    )
    assert (
        total(
            api_metrics, "orchestrator_http_request_duration_seconds_count", path="/api/chat/send"
        )
        == 3
    )
    assert total(api_metrics, "orchestrator_websocket_messages_total", direction="out") >= 3

    worker_metrics = scrape(worker.metrics_port)
    assert (
        total(worker_metrics, "orchestrator_tasks_total", status="completed", tier="enterprise")
        == 3
    )
    assert total(worker_metrics, "orchestrator_answer_seconds_count", tier="enterprise") == 3
    assert total(worker_metrics, "orchestrator_time_to_first_chunk_seconds_count") == 2
    assert (
        total(worker_metrics, "orchestrator_usage_tokens_total", tenant=tenant, direction="output")
        > 0
    )
    assert total(worker_metrics, "orchestrator_callbacks_total", verdict="ok") >= 3
    # Every callback that changed something was timed from its XADD, and nothing else was.
    applied = total(worker_metrics, "orchestrator_callbacks_total", verdict="ok")
    assert total(worker_metrics, "orchestrator_delivery_lag_seconds_count", hop="worker") == applied
    # Live events reached the api's socket: at least the three answers, at most what it sent.
    delivered = total(api_metrics, "orchestrator_delivery_lag_seconds_count", hop="api")
    assert (
        3
        <= delivered
        <= total(api_metrics, "orchestrator_websocket_messages_total", direction="out")
    )
    for samples, hop, count in (
        (worker_metrics, "worker", applied),
        (api_metrics, "api", delivered),
    ):
        mean = total(samples, "orchestrator_delivery_lag_seconds_sum", hop=hop) / count
        assert 0 <= mean < 2, f"{hop}: mean lag {mean} s on loopback"

    executor_metrics = scrape(executor.metrics_port)
    assert total(executor_metrics, "orchestrator_executor_tasks_total", outcome="completed") == 3
    assert total(executor_metrics, "orchestrator_queue_wait_seconds_count", priority="high") == 3
    await ws.close()


async def test_a_cancelled_task_is_counted_by_the_api(
    metered: tuple[LocalStack, Child, Child, Child],
) -> None:
    """The api cancels, so it counts `status="cancelled"` (it counted nothing before)."""
    _, api, _, _ = metered
    tenant, session = unique("t"), unique("s")
    before = total(scrape(api.metrics_port), "orchestrator_tasks_total", status="cancelled")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        stalled = {"simulate": {"stall": True}}  # the executor never answers: still running
        body = {"message": "wait", "session_id": session, "context": stalled}
        task_id = (await send(http, api.url, tenant, body)).json()["task_id"]
        cancel = await http.post(
            f"{api.url}/api/chat/cancel", json={"task_id": task_id}, headers=auth(tenant)
        )
        assert cancel.status_code == 200, cancel.text
    assert (await events_until(ws, final_of(task_id)))[-1]["type"] == "chat.cancelled"
    await ws.close()
    after = scrape(api.metrics_port)
    assert total(after, "orchestrator_tasks_total", status="cancelled", tier="enterprise") == (
        before + 1
    )


async def test_stream_lag_is_reported_once_per_stream(
    metered: tuple[LocalStack, Child, Child, Child],
) -> None:
    _, _, worker, _ = metered
    wanted = {f"{{cb:{n}}}:callbacks" for n in range(8)} | {"{aes}:actions:high"}
    deadline = time.monotonic() + 15  # sampled at every lease round (a third of the lease)
    while True:
        samples = scrape(worker.metrics_port)
        lag = {
            dict(labels)["stream"]
            for (name, labels) in samples
            if name == "orchestrator_stream_lag"
        }
        if wanted <= lag or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert wanted <= lag
    pending = {
        dict(labels)["stream"]
        for (name, labels) in samples
        if name == "orchestrator_stream_pending"
    }
    assert pending == lag, "lag and pending are reported together"


async def test_each_process_reports_its_garbage_collection_pauses(
    metered: tuple[LocalStack, Child, Child, Child],
) -> None:
    """The full collection made when a process freezes its start-up heap is the first one
    observed: each process shows at least that one, with a duration."""
    _, api, worker, executor = metered
    for child in (api, worker, executor):
        samples = scrape(child.metrics_port)
        full = total(samples, "orchestrator_gc_pause_seconds_count", generation="2")
        assert full >= 1, child.role
        assert total(samples, "orchestrator_gc_pause_seconds_sum", generation="2") > 0, child.role


async def test_probes_are_not_counted_but_the_detailed_health_is(
    metered: tuple[LocalStack, Child, Child, Child],
) -> None:
    """The probes (/health, /health/ready: every few seconds per pod) stay out of the HTTP
    metrics; the exclusion matched by prefix and dropped /health/detailed too."""
    _, api, _, _ = metered
    async with httpx.AsyncClient(base_url=api.url) as http:
        for path in ("/health", "/health/ready", "/health/detailed"):
            assert (await http.get(path)).status_code == 200
    api_metrics = scrape(api.metrics_port)
    assert total(api_metrics, "orchestrator_http_requests_total", path="/health/detailed") == 1
    assert total(api_metrics, "orchestrator_http_requests_total", path="/health") == 0
    assert total(api_metrics, "orchestrator_http_requests_total", path="/health/ready") == 0


async def test_requests_no_route_takes_are_counted_under_one_path(
    metered: tuple[LocalStack, Child, Child, Child],
) -> None:
    """Litestar's middleware runs inside a route: a 404 for an unknown path and a 405 for a
    wrong method were in no metric (a scan, or a frontend calling a wrong method, never showed
    on the dashboard). Counted now, under one path label whatever the path, so a client cannot
    create series; a 404 a route answers stays under its template."""
    _, api, _, _ = metered
    tenant = unique("t")
    async with httpx.AsyncClient(base_url=api.url) as http:
        for path in ("/no/such/path", f"/{unique('random')}"):
            assert (await http.get(path)).status_code == 404
        assert (await http.put("/api/chat/send", json={})).status_code == 405
        missing = await http.get("/api/chat/tasks/no-such-task", headers=auth(tenant))
        assert missing.status_code == 404, missing.text
    samples = scrape(api.metrics_port)
    unrouted = {"path": "<unrouted>", "app_name": "agent-orchestrator"}
    name = "orchestrator_http_requests_total"
    assert total(samples, name, method="GET", status_code="404", **unrouted) == 2
    assert total(samples, name, method="PUT", status_code="405", **unrouted) == 1
    assert total(samples, "orchestrator_http_request_duration_seconds_count", **unrouted) == 3
    assert not [
        labels for (n, labels) in samples if n == name and ("path", "/no/such/path") in labels
    ]
    assert total(samples, name, path="/api/chat/tasks/{task_id}", status_code="404") == 1

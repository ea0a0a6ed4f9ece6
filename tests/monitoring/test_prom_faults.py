"""The chart's alerts against a real Prometheus while real processes meet real faults.

Needs the `prometheus` binary (Debian's package, which `make test` installs). Each test has
its own Valkey, api, worker and executor, scraped every second and evaluated every second.
The rules' `for:` durations are fixed in files/alerts.yaml (no chart value shortens them), so
a test checks that an alert's condition holds (the alert is pending, or firing for a `for: 0m`
rule) with its labels and annotations rendered, never waits 10 min.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from services.core import keys
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.conftest import new_stack
from tests.monitoring.prom import SERVICE_OF, Prometheus, rendered, targets_of

pytestmark = pytest.mark.e2e


@dataclass
class Monitored:
    redis: RedisServer
    stack: LocalStack
    api: Child
    prometheus: Prometheus

    def child(self, role: str) -> Child:
        return next(child for child in self.stack.children if child.role == role)

    def client(self) -> Redis:
        return Redis.from_url(self.redis.url)


@pytest.fixture
def monitored(tmp_path: Path) -> Iterator[Monitored]:
    """A fresh deployment scraped by a fresh Prometheus, quiet and healthy at first."""
    redis = RedisServer().start()
    stack = new_stack(
        redis,
        tmp_path / "logs",
        executor_chunk_delay_ms="1",
        max_websocket_connections="10",
        retry_backoff_seconds="0.05",
        retry_backoff_max_seconds="0.1",
    )
    prometheus = Prometheus(rendered())
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        prometheus.start(targets_of(stack.children))
        yield Monitored(redis, stack, api, prometheus)
    finally:
        prometheus.stop()
        stack.stop()
        redis.cleanup()


async def chat(api: Child, contexts: list[dict[str, Any]], wait: bool = True) -> list[str]:
    """Send one message per context on one session, with its socket open; the task ids (after
    their final events when `wait`)."""
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    ids = []
    async with httpx.AsyncClient() as http:
        for context in contexts:
            reply = await send(
                http, api.url, tenant, {"message": "hi", "session_id": session, "context": context}
            )
            assert reply.status_code == 202, reply.text
            ids.append(reply.json()["task_id"])
    if wait:
        for task_id in ids:
            await events_until(ws, final_of(task_id))
    await ws.close()
    return ids


def assert_rendered(alert: dict[str, Any]) -> None:
    """Labels and annotations free of Go template holes."""
    text = repr(alert["labels"]) + repr(alert["annotations"])
    assert "<no value>" not in text, alert
    assert "{{" not in text, alert
    assert alert["annotations"]["summary"], alert
    assert alert["annotations"]["runbook_url"], alert


def active(prometheus: Prometheus, name: str) -> list[dict[str, Any]]:
    return [a for a in prometheus.alert_named(name) if a["state"] in ("pending", "firing")]


def test_idle_deployment_raises_nothing(monitored: Monitored) -> None:
    """Just started and idle: every rule evaluates cleanly (no division by zero, no NaN
    comparisons that hold) and no alert is pending. Needs prometheus."""
    prometheus = monitored.prometheus
    prometheus.scraped_after(time.time() + 3)
    assert [rule for rule in prometheus.rule_health() if rule[1] != "ok"] == []
    assert prometheus.alerts() == []


def test_dead_letter_fires_its_alert(monitored: Monitored) -> None:
    """A malformed callback is dead-lettered by the worker: `OrchestratorDeadLetters` (for: 0m)
    fires, and its description counts the dead letters in whole entries (one here), not
    `increase()`'s extrapolated 1.27. Needs prometheus."""
    prometheus = monitored.prometheus
    prometheus.scraped_after(time.time() + 1)  # the counter's 0 is on record first
    with monitored.client() as redis:
        redis.xadd(keys.callback_stream(0), {"junk": "1"})
    prometheus.wait(
        lambda: any(a["state"] == "firing" for a in active(prometheus, "OrchestratorDeadLetters")),
        "OrchestratorDeadLetters firing",
    )
    (alert,) = active(prometheus, "OrchestratorDeadLetters")
    assert_rendered(alert)
    count = alert["annotations"]["description"].split(" ")[0]
    assert count == "1", alert["annotations"]["description"]


def test_redis_down_raises_the_error_rate_alert(monitored: Monitored) -> None:
    """With Redis stopped every send is a 503: `OrchestratorHighErrorRate`'s condition holds
    (pending) with the ratio rendered as a percentage. Needs prometheus."""
    prometheus = monitored.prometheus
    asyncio.run(chat(monitored.api, [{}]))
    prometheus.scraped_after(time.time() + 1)
    monitored.redis.stop()

    async def refused() -> None:
        async with httpx.AsyncClient() as http:
            for _ in range(5):
                reply = await send(http, monitored.api.url, "t-down", {"message": "hi"})
                assert reply.status_code == 503, reply.text

    asyncio.run(refused())
    prometheus.scraped_after(time.time() + 1)
    asyncio.run(refused())
    prometheus.wait(
        lambda: bool(active(prometheus, "OrchestratorHighErrorRate")),
        "OrchestratorHighErrorRate pending",
    )
    (alert,) = active(prometheus, "OrchestratorHighErrorRate")
    assert_rendered(alert)
    assert alert["annotations"]["description"].endswith("over the last 5 minutes."), alert


def test_aes_down_raises_the_stream_lag_alert(monitored: Monitored) -> None:
    """With the executor stopped, actions wait in `{aes}:actions:*`: `OrchestratorStreamLag`
    (threshold 5 through `monitoring.prometheusRule.streamLag`) is pending for group `aes`,
    its summary naming the stream. Needs prometheus."""
    prometheus = monitored.prometheus
    asyncio.run(chat(monitored.api, [{}]))  # the executor's group exists
    monitored.stack.stop_child(monitored.child("executor"))
    asyncio.run(chat(monitored.api, [{}] * 8, wait=False))
    prometheus.wait(
        lambda: bool(active(prometheus, "OrchestratorStreamLag")),
        "OrchestratorStreamLag pending",
    )
    alerts = active(prometheus, "OrchestratorStreamLag")
    assert {a["labels"]["group"] for a in alerts} == {keys.AES_GROUP}, alerts
    for alert in alerts:
        assert_rendered(alert)
        assert alert["labels"]["stream"] in alert["annotations"]["summary"], alert


def test_sockets_at_the_cap_raise_the_connection_alert(monitored: Monitored) -> None:
    """Ten sockets on a pod capped at ten: `OrchestratorPodNearConnectionCap` is pending for
    that pod, its summary naming the pod and the cap. Needs prometheus."""
    prometheus = monitored.prometheus

    async def hold() -> None:
        tenant = unique("t")
        sockets = [(await connect(monitored.api.ws_url, tenant, unique("s")))[0] for _ in range(10)]
        try:
            prometheus.wait(
                lambda: bool(active(prometheus, "OrchestratorPodNearConnectionCap")),
                "OrchestratorPodNearConnectionCap pending",
            )
        finally:
            for ws in sockets:
                await ws.close()

    asyncio.run(hold())
    (alert,) = active(prometheus, "OrchestratorPodNearConnectionCap")
    assert_rendered(alert)
    assert alert["labels"]["pod"] in alert["annotations"]["summary"], alert
    assert "cap of 10" in alert["annotations"]["summary"], alert


def unread_callbacks(redis: Redis, pending: bool = False) -> int:
    """Entries of the callback partitions the workers' group has not read (XINFO's lag), and
    those read but not acknowledged too when `pending`."""
    total = 0
    for partition in range(8):
        stream = keys.callback_stream(partition)
        if not redis.exists(stream):
            continue
        for group in redis.xinfo_groups(stream):
            if group["name"].decode() == keys.WORKER_GROUP:
                total += int(group.get("lag") or 0)
                total += int(group["pending"]) if pending else 0
    return total


def test_workers_down_raise_an_alert(monitored: Monitored) -> None:
    """Every worker stopped: the AES's answers pile up unread in `{cb:N}:callbacks` and no
    client gets an answer. No rule's condition held: the lag gauge is the workers' own, gone
    with them. `OrchestratorComponentDown` is pending for the worker's job, and only it."""
    prometheus = monitored.prometheus
    asyncio.run(chat(monitored.api, [{}]))
    monitored.stack.stop_child(monitored.child("worker"))
    asyncio.run(chat(monitored.api, [{}] * 8, wait=False))
    with monitored.client() as redis:
        deadline = time.monotonic() + 20
        while unread_callbacks(redis) < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        unread = unread_callbacks(redis)
    assert unread >= 8, unread  # the fault is real: answers wait for a worker
    prometheus.scraped_after(time.time() + 5)
    down = active(prometheus, "OrchestratorComponentDown")
    lag_series = prometheus.query("orchestrator_stream_lag")
    assert [a["labels"]["job"] for a in down] == [SERVICE_OF["worker"]], (
        f"{unread} callbacks unread, alerts {prometheus.alerts()}; orchestrator_stream_lag "
        f"has {len(lag_series)} series (only workers report it)"
    )
    assert_rendered(down[0])


def panel(prometheus: Prometheus, title: str) -> str:
    """The first query of the dashboard panel `title`, Grafana's variables filled in."""
    return next(e for t, e, _ in prometheus.monitoring.panel_targets() if t == title)


def test_first_failure_of_a_pod_shows_on_a_panel(monitored: Monitored) -> None:
    """A pod's first failed task: `orchestrator_tasks_total{status="failed"}` goes to 1 on
    the worker, yet "Failed and timed-out tasks / s by tier" must show it. The labelled
    series is born at that increment (prometheus_client exports a label set once used), so
    rate() has no earlier sample to compare with. Needs prometheus."""
    prometheus = monitored.prometheus
    asyncio.run(chat(monitored.api, [{}]))  # tier "enterprise" seen, "completed" counted
    prometheus.scraped_after(time.time() + 1)
    asyncio.run(chat(monitored.api, [{"simulate": {"fail_attempts": 9, "retryable": False}}]))
    prometheus.scraped_after(time.time() + 2)
    raw = prometheus.query('sum(orchestrator_tasks_total{namespace="chat", status="failed"})')
    assert [float(s["value"][1]) for s in raw] == [1.0], raw
    shown = prometheus.query(panel(prometheus, "Failed and timed-out tasks / s by tier"))
    assert any(float(s["value"][1]) > 0 for s in shown if not math.isnan(float(s["value"][1]))), (
        f"one failed task counted, the panel shows {shown}"
    )

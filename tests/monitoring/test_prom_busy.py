"""The chart's dashboard and alerts against a real Prometheus scraping a busy real deployment.

Needs the `prometheus` and `promtool` binaries (Debian's package, which `make test`
installs). One api, worker (with its persistence writer on a real
PostgreSQL) and executor on a Valkey of the module's own, scraped every second.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import LocalStack
from services.persistence.migrate import migrate
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.conftest import new_stack
from tests.monitoring.prom import (
    PROMTOOL,
    Monitoring,
    Prometheus,
    rendered,
    targets_of,
)

pytestmark = pytest.mark.e2e

SESSION_LIMIT = 4  # sends per minute per session: the rate-limit refusals
MESSAGE_CHARS = 200  # the process's bound (a longer body is refused before admission)
TIER_MESSAGE_CHARS = 100  # the tier's: a longer message is a quota refusal


@pytest.fixture(scope="module")
def monitoring() -> Monitoring:
    return rendered()


@pytest.fixture(scope="module")
def busy(
    monitoring: Monitoring, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, Prometheus]]:
    """The deployment and its Prometheus, after a round of every kind of healthy traffic."""
    redis = RedisServer().start()
    postgres = PostgresServer(durable=False).start()
    stack = new_stack(
        redis,
        tmp_path_factory.mktemp("logs"),
        database_url=postgres.url(),
        executor_chunk_delay_ms="1",
        max_websocket_connections="10",
        tiers=json.dumps(
            {
                "enterprise": {
                    "requestsPerMinutePerSession": SESSION_LIMIT,
                    "maxMessageChars": TIER_MESSAGE_CHARS,
                }
            }
        ),
        max_message_chars=str(MESSAGE_CHARS),
        retry_backoff_seconds="0.05",
        retry_backoff_max_seconds="0.1",
    )
    prometheus = Prometheus(monitoring)
    try:
        asyncio.run(migrate(postgres.url()))
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        prometheus.start(targets_of(stack.children))
        # Twice: a series a process did not create at its start (one label set per route and
        # status of the HTTP metrics, say) is born at its first increment, which no rate()
        # can see; the second round is what a deployment busy for a while shows.
        asyncio.run(traffic(api.url, api.ws_url))
        prometheus.scraped_after(time.time() + 1)
        asyncio.run(traffic(api.url, api.ws_url))
        prometheus.scraped_after(time.time() + 2)
        yield stack, prometheus
    finally:
        prometheus.stop()
        stack.stop()
        postgres.cleanup()
        redis.cleanup()


async def traffic(base: str, ws_base: str) -> None:
    """Sends over HTTP and over the socket, a retried and a failed task, rate-limit and quota
    refusals: what a busy healthy deployment does in a few seconds."""
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(ws_base, tenant, session)
    contexts: list[dict[str, Any]] = [
        {},
        {"simulate": {"fail_attempts": 1}},
        {"simulate": {"fail_attempts": 9, "retryable": False}},
        {"simulate": {"repeat": 5}},
    ]
    async with httpx.AsyncClient() as http:
        for number, context in enumerate(contexts):
            reply = await send(
                http,
                base,
                tenant,
                {
                    "message": f"busy {number}",
                    "stream": number % 2 == 0,
                    "session_id": session,
                    "context": context,
                },
            )
            assert reply.status_code == 202, reply.text
            await events_until(ws, final_of(reply.json()["task_id"]))
        limited = unique("s")
        codes = [
            (
                await send(http, base, tenant, {"message": "again", "session_id": limited})
            ).status_code
            for _ in range(SESSION_LIMIT + 2)
        ]
        assert 429 in codes, codes
        too_long = await send(
            http, base, tenant, {"message": "x" * (TIER_MESSAGE_CHARS + 1), "session_id": session}
        )
        assert too_long.status_code in (400, 413, 422, 429), too_long.text
    await ws.close()


def test_rendered_rules_pass_promtool(monitoring: Monitoring, tmp_path: Path) -> None:
    """`promtool check rules` accepts the rendered PrometheusRule spec (needs promtool)."""
    assert PROMTOOL
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(monitoring.rules))
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


SELECTOR = re.compile(r"\b(orchestrator_[a-z_]+?)(?:_bucket|_count|_sum)?(\{[^}]*\})")


def has_data(value: list[Any]) -> bool:
    return not math.isnan(float(value[1]))


def test_every_panel_shows_data_its_metric_has(busy: tuple[LocalStack, Prometheus]) -> None:
    """A panel whose query returns nothing (or only NaN) while its metric has series in the
    namespace is broken: a wrong label, a `_bucket`/`le` mistake, a rate window too short.
    A panel's legend must name only labels its query keeps. Needs prometheus."""
    _, prometheus = busy
    empty, legends = [], []
    for title, expr, legend in prometheus.monitoring.panel_targets():
        result = prometheus.query(expr)
        if not any(has_data(series["value"]) for series in result):
            selector = SELECTOR.search(expr)
            assert selector, expr
            raw = prometheus.query(f'{{__name__=~"{selector.group(1)}.*", {selector.group(2)[1:]}')
            if raw:
                empty.append(f"{title}: {expr}")

            continue
        for name in re.findall(r"{{\s*(\w+)\s*}}", legend):
            missing = [s["metric"] for s in result if name not in s["metric"]]
            if missing:
                legends.append(f"{title}: legend {legend!r} but series {missing[0]}")
    assert not empty, "panels empty while their metric has data:\n" + "\n".join(empty)
    assert not legends, "\n".join(legends)


def test_no_alert_on_a_busy_healthy_deployment(busy: tuple[LocalStack, Prometheus]) -> None:
    """Retries, a failed task, refusals and sockets are normal: no alert is even pending, and
    every rule evaluates without error. Needs prometheus."""
    _, prometheus = busy
    prometheus.wait(
        lambda: all(health == "ok" for _, health, _ in prometheus.rule_health()),
        "every rule evaluated",
        10,
    )
    assert prometheus.alerts() == []


def test_5xx_ratio_stat_reads_zero_when_nothing_failed(busy: tuple[LocalStack, Prometheus]) -> None:
    """The "HTTP 5xx ratio" stat on a busy deployment that answered no 5xx must read 0 %, not
    "No data": with no 5xx series the numerator is an empty vector and so is the ratio, which
    an SRE cannot tell from a broken scrape. Needs prometheus."""
    _, prometheus = busy
    assert prometheus.query('sum(orchestrator_http_requests_total{namespace="chat"})')
    expr = next(e for t, e, _ in prometheus.monitoring.panel_targets() if t == "HTTP 5xx ratio")
    result = prometheus.query(expr)
    assert [float(series["value"][1]) for series in result] == [0.0], result

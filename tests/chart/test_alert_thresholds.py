"""Every alert threshold values.schema.json accepts must leave its alert able to fire.

Each test renders the chart with the real Helm SDK (production values, Prometheus Operator
known to Helm, one threshold set to the schema's extreme), parses the rendered alert with
`promql-parser`, reads its comparison, and holds it against what REAL processes expose at the
worst moment the alert is meant for (an api pod at its socket cap, an api answering nothing but
5xx, a histogram's real bucket bounds). Prometheus semantics used: `a > b` keeps a sample only
when it is strictly greater, `a >= b` when it is greater or equal; `histogram_quantile` never
returns more than the upper bound of the highest finite bucket (a quantile in the +Inf bucket
returns that bound). A ratio whose inclusive maximum is what the metric reaches at worst must
therefore be compared with >=, and a quantile threshold must stay below the top bucket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import websockets
from helm_python import HelmValuesError
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from services.core.metric_buckets import LATENCY_BUCKETS
from tests.chart.conftest import (
    KEDA_APIS,
    PROMETHEUS_OPERATOR_APIS,
    Rendered,
    load_values,
    parse,
    render,
)
from tests.e2e.clients import connect, send, token, unique
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
CAP = 2  # ORCHESTRATOR_MAX_WEBSOCKET_CONNECTIONS of the api under test


# ---------------------------------------------------------------------------------------------
# helpers


def _render(overrides: dict[str, Any]) -> Rendered:
    """Production values with `overrides` merged in (two levels deep), rendered by Helm, which
    validates them against values.schema.json: a refused value raises HelmValuesError here."""
    values = load_values("production.yaml")
    for section, entries in overrides.items():
        target = values.setdefault(section, {})
        for key, value in entries.items():
            if isinstance(value, dict):
                target.setdefault(key, {}).update(value)
            else:
                target[key] = value
    return parse("thresholds", values, render(values, PROMETHEUS_OPERATOR_APIS + KEDA_APIS))


def _alert_expr(rendered: Rendered, name: str) -> Any:
    (rule,) = rendered.of_kind("PrometheusRule")
    (alert,) = [r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == name]
    return promql_parser.parse(alert["expr"])


def _number(node: Any) -> float:
    """The value of a constant expression (numbers, + - * /, parentheses)."""
    if isinstance(node, promql_parser.NumberLiteral):
        return float(node.val)
    if isinstance(node, promql_parser.ParenExpr):
        return _number(node.expr)
    assert isinstance(node, promql_parser.BinaryExpr), f"not a constant: {node}"
    lhs, rhs, op = _number(node.lhs), _number(node.rhs), str(node.op)
    return {"+": lhs + rhs, "-": lhs - rhs, "*": lhs * rhs, "/": lhs / rhs}[op]


def _comparison(expr: Any) -> tuple[str, float]:
    """`<vector> > <constant>` or `<vector> >= <constant>`: the operator and the constant."""
    assert isinstance(expr, promql_parser.BinaryExpr), expr
    op = str(expr.op)
    assert op in (">", ">="), expr
    return op, _number(expr.rhs)


def _fires(value: float, op: str, threshold: float) -> bool:
    """Whether Prometheus keeps a sample of `value` under `<op> threshold` (the alert fires)."""
    return value >= threshold if op == ">=" else value > threshold


def _scrape(port: int | None) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a process's /metrics, asked for the way Prometheus asks (OpenMetrics)."""
    reply = httpx.get(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS}, timeout=5
    )
    assert reply.headers["content-type"].startswith("application/openmetrics-text")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


# ---------------------------------------------------------------------------------------------
# real processes


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, Child, Child, Child]]:
    """api (capped at CAP sockets), worker and executor on the session's Redis."""
    logs: Path = tmp_path_factory.mktemp("alert-thresholds-logs")
    local = new_stack(
        redis_server,
        logs,
        executor_chunk_delay_ms="1",
        max_websocket_connections=str(CAP),
    )
    try:
        api = local.start_api()
        worker = local.start("worker")
        executor = local.start("executor")
        local.wait_ready(api)
        yield local, api, worker, executor
    finally:
        local.stop()


# ---------------------------------------------------------------------------------------------
# OrchestratorPodNearConnectionCap


async def test_near_cap_alert_fires_for_a_pod_at_its_cap_at_the_largest_allowed_ratio(
    stack: tuple[LocalStack, Child, Child, Child],
) -> None:
    """The schema accepts `connectionCapRatio: 1` ("maximum": 1, inclusive), and a pod never
    holds more than its cap (the next socket is refused with 1013 `pod_full`): with `> 1 * cap`
    the alert could not fire at the very moment the pod is full, so the rule compares with >=."""
    _, api, _, _ = stack
    rendered = _render(
        {
            "config": {"maxWebsocketConnections": CAP},
            "api": {"autoscaling": {"targetConnectionsPerPod": CAP - 1}},
            "monitoring": {"prometheusRule": {"connectionCapRatio": 1}},
        }
    )  # rendered: the schema accepted the ratio
    op, threshold = _comparison(_alert_expr(rendered, "OrchestratorPodNearConnectionCap"))

    tenant = unique("t")
    sockets = [await connect(api.ws_url, tenant, unique("s")) for _ in range(CAP)]
    try:
        # The pod is full: the next handshake is refused with 1013 (try again later).
        extra = await websockets.connect(
            f"{api.ws_url}/ws/{tenant}/{unique('s')}",
            subprotocols=["orchestrator.v1", f"bearer.{token(tenant)}"],  # type: ignore[list-item]
            open_timeout=10,
        )
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(extra.recv(), 10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1013
        (gauge,) = [v for _, v in _scrape(api.metrics_port)["orchestrator_websocket_connections"]]
        assert gauge == CAP, "the pod holds exactly its cap"
        assert _fires(gauge, op, threshold), (
            f"a pod at its cap ({gauge:g} sockets, refusing new ones) does not satisfy "
            f"`{op} {threshold:g}`: with connectionCapRatio=1, which values.schema.json accepts, "
            "OrchestratorPodNearConnectionCap can never fire"
        )
    finally:
        for ws, _ in sockets:
            await ws.close()


# ---------------------------------------------------------------------------------------------
# OrchestratorSlowDelivery


async def _top_finite_delivery_bucket(stack: tuple[LocalStack, Child, Child, Child]) -> float:
    """The highest finite `le` of orchestrator_delivery_lag_seconds that the worker and the api
    expose, once one answer has gone through both hops (so both histograms have series)."""
    _, api, worker, _ = stack
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    try:
        async with httpx.AsyncClient() as http:
            reply = await send(http, api.url, tenant, {"message": "lag", "session_id": session})
            assert reply.status_code == 202, reply.text
        async with asyncio.timeout(20):  # the answer reached the socket: both hops observed
            while '"chat.response"' not in str(await ws.recv()):
                pass
    finally:
        await ws.close()
    tops = []
    for child, hop in ((worker, "worker"), (api, "api")):
        buckets = [
            float(labels["le"])
            for labels, _ in _scrape(child.metrics_port)["orchestrator_delivery_lag_seconds_bucket"]
            if labels["hop"] == hop
        ]
        tops.append(max(b for b in buckets if b != float("inf")))
    return min(tops)


async def test_slow_delivery_threshold_at_or_above_the_top_bucket_is_refused(
    stack: tuple[LocalStack, Child, Child, Child],
) -> None:
    """`histogram_quantile(0.99, ...) > deliveryLagSeconds` never fires at or above the highest
    finite `le` (300 s): however late events are, the quantile returns 300. The schema refuses
    such values ("page me when events are 10 minutes late" would be silent forever), and the
    largest value it takes still renders a threshold below the top bucket."""
    top = await _top_finite_delivery_bucket(stack)
    assert top == LATENCY_BUCKETS[-1], "the processes expose the shared buckets"

    for seconds in (top, 600):
        with pytest.raises(HelmValuesError, match="deliveryLagSeconds"):
            _render({"monitoring": {"prometheusRule": {"deliveryLagSeconds": seconds}}})

    largest = top - 0.001  # just below the schema's exclusiveMaximum
    rendered = _render({"monitoring": {"prometheusRule": {"deliveryLagSeconds": largest}}})
    expr = _alert_expr(rendered, "OrchestratorSlowDelivery")
    assert isinstance(expr.lhs, promql_parser.Call)
    assert expr.lhs.func.name == "histogram_quantile"
    op, threshold = _comparison(expr)
    assert _fires(top, op, threshold), (
        f"deliveryLagSeconds={largest:g} renders `histogram_quantile(0.99, ...) {op} "
        f"{threshold:g}`, which a p99 capped at le={top:g} never satisfies"
    )


# ---------------------------------------------------------------------------------------------
# OrchestratorHighErrorRate


@pytest.fixture
def doomed_stack(tmp_path: Path) -> Iterator[tuple[RedisServer, Child]]:
    """An api of its own on a Redis of its own (the test stops that Redis)."""
    server = RedisServer().start()
    local = new_stack(server, tmp_path / "logs")
    try:
        api = local.start_api()
        local.wait_ready(api)
        yield server, api
    finally:
        local.stop()
        server.cleanup()


async def test_error_rate_alert_fires_when_every_request_fails_at_the_largest_allowed_ratio(
    doomed_stack: tuple[RedisServer, Child],
) -> None:
    """The schema accepts `errorRatio: 1` ("maximum": 1, inclusive) and the 5xx ratio is at most
    1: with `ratio > 1` the alert would stay silent while the api answers every request with
    503, so the rule compares with >=."""
    server, api = doomed_stack
    rendered = _render({"monitoring": {"prometheusRule": {"errorRatio": 1}}})
    op, threshold = _comparison(_alert_expr(rendered, "OrchestratorHighErrorRate"))

    server.stop()  # Redis gone: every send is answered 503 `unavailable`
    tenant = unique("t")
    async with httpx.AsyncClient() as http:
        for _ in range(3):
            reply = await send(http, api.url, tenant, {"message": "hello?"})
            assert reply.status_code == 503, reply.text
    requests = _scrape(api.metrics_port)["orchestrator_http_requests_total"]
    failed = sum(v for labels, v in requests if labels["status_code"].startswith("5"))
    total = sum(v for _, v in requests)
    assert total > 0, requests
    assert failed == total, requests
    ratio = failed / total
    assert _fires(ratio, op, threshold), (
        f"every request failed (5xx ratio {ratio:g}) yet `ratio {op} {threshold:g}` is false: "
        "with errorRatio=1, which values.schema.json accepts, OrchestratorHighErrorRate can "
        "never fire"
    )

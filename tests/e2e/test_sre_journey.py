"""The SRE's journey: what README "Observability", docs/kubernetes.md "Runbooks" and DESIGN §7
promise to whoever watches a running deployment, checked against real processes (Redis,
PostgreSQL, api, worker, executor, an OTLP/HTTP receiver)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.otlp_sink import ReceivedSpan, Receiver
from services.cli.stack import Child, LocalStack
from services.persistence.migrate import migrate
from tests.e2e.clients import (
    SECRET,
    connect,
    events_until,
    final_of,
    next_event,
    send,
    token,
    unique,
)
from tests.e2e.conftest import new_stack
from tests.e2e.test_tracing import exemplar_traces

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DB_PASSWORD = "Sre-Pa55word-" + "q" * 12
PER_SESSION = 6  # a tier of this test's own: a few sends reach the session's rate limit


@dataclass
class Family:
    type: str
    labels: set[str]
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int | None) -> dict[str, Family]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found: dict[str, Family] = {}
    for family in text_string_to_metric_families(text):
        labels: set[str] = set()
        samples = {}
        for sample in family.samples:
            labels |= set(sample.labels) - {"le", "quantile"}
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        found[family.name] = Family(family.type, labels, samples)
    return found


def value(families: dict[str, Family], sample: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(
        v
        for family in families.values()
        for (name, got), v in family.samples.items()
        if name == sample and wanted <= set(got)
    )


@dataclass
class Watched:
    stack: LocalStack
    api: Child
    worker: Child
    executor: Child
    receiver: Receiver
    redis: RedisServer
    postgres: PostgresServer

    @property
    def children(self) -> dict[str, Child]:
        return {"api": self.api, "worker": self.worker, "executor": self.executor}

    def logs(self) -> list[str]:
        return [
            line
            for child in self.stack.children
            if child.log_path is not None
            for line in child.log_path.read_text().split("\n")[:-1]
            if line.strip()
        ]


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    """api, worker and executor on their own Redis and PostgreSQL (reached by a URL with a
    password: the embedded server trusts local clients, so any password is accepted), every
    process exporting spans to an OTLP/HTTP receiver."""
    redis = RedisServer().start()
    postgres = PostgresServer(durable=False).start()
    receiver = Receiver().start()
    url = postgres.url().replace("@", f":{DB_PASSWORD}@", 1)
    asyncio.run(migrate(postgres.url()))
    stack = new_stack(
        redis,
        tmp_path_factory.mktemp("logs"),
        database_url=url,
        executor_chunk_delay_ms="1",
        default_tier="pro",
        tiers=json.dumps({"pro": {"requestsPerMinutePerSession": PER_SESSION}}),
    )
    stack.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    stack.env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    try:
        api = stack.start_api()
        worker = stack.start("worker")
        executor = stack.start("executor")
        stack.wait_ready(api)
        yield Watched(stack, api, worker, executor, receiver, redis, postgres)
    finally:
        stack.stop()
        receiver.stop()
        postgres.cleanup()
        redis.cleanup()


async def chat_on(
    api: Child, *, stream: bool = True, message: str = "observe me"
) -> tuple[str, str]:
    """One message sent by REST and answered on the session's socket: (tenant, task id)."""
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant, {"message": message, "stream": stream, "session_id": session}
        )
    assert reply.status_code == 202, reply.text
    task_id: str = reply.json()["task_id"]
    await events_until(ws, final_of(task_id))
    await ws.close()
    return tenant, task_id


async def chat(w: Watched, *, stream: bool = True, message: str = "observe me") -> str:
    return (await chat_on(w.api, stream=stream, message=message))[1]


async def until(check: Any, what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


# --- metrics: every name README/DESIGN gives, on the process README says, with its type ---

# (process, family name as prometheus_client parses it, type, labels README/DESIGN name)
DOCUMENTED = [
    ("api", "orchestrator_websocket_connections", "gauge", set()),
    ("api", "orchestrator_websocket_messages", "counter", {"direction"}),
    ("api", "orchestrator_http_requests", "counter", {"method", "status_code", "path"}),
    (
        "api",
        "orchestrator_http_request_duration_seconds",
        "histogram",
        {"method", "status_code", "path"},
    ),
    ("api", "orchestrator_tasks", "counter", {"status", "tier"}),
    ("api", "orchestrator_rate_limit_rejections", "counter", {"scope"}),
    ("api", "orchestrator_quota_rejections", "counter", {"reason"}),
    ("api", "orchestrator_delivery_lag_seconds", "histogram", {"hop"}),
    ("executor", "orchestrator_queue_wait_seconds", "histogram", set()),
    ("worker", "orchestrator_tasks", "counter", {"status", "tier"}),
    ("worker", "orchestrator_time_to_first_chunk_seconds", "histogram", set()),
    ("worker", "orchestrator_answer_seconds", "histogram", set()),
    ("worker", "orchestrator_usage_tokens", "counter", {"tenant", "direction"}),
    ("worker", "orchestrator_usage_cost", "counter", {"tenant"}),
    ("worker", "orchestrator_stream_lag", "gauge", {"stream"}),
    ("worker", "orchestrator_stream_pending", "gauge", {"stream"}),
    ("worker", "orchestrator_stream_trimmed_entries", "counter", set()),
    ("worker", "orchestrator_dead_letters", "counter", set()),
    ("worker", "orchestrator_dead_letters_dropped", "counter", set()),
    ("worker", "orchestrator_late_callbacks", "counter", set()),
    ("worker", "orchestrator_task_retries", "counter", set()),
    ("worker", "orchestrator_task_timeouts", "counter", set()),
    ("worker", "orchestrator_persistence_backlog", "gauge", set()),
    ("worker", "orchestrator_delivery_lag_seconds", "histogram", {"hop"}),
    ("api", "orchestrator_gc_pause_seconds", "histogram", {"generation"}),
    ("worker", "orchestrator_gc_pause_seconds", "histogram", {"generation"}),
    ("executor", "orchestrator_gc_pause_seconds", "histogram", {"generation"}),
]


def _have_series(w: Watched) -> dict[str, dict[str, Family]]:
    scraped = {name: scrape(child.metrics_port) for name, child in w.children.items()}
    lag = scraped["worker"].get("orchestrator_stream_lag")
    return scraped if lag is not None and lag.samples else {}


async def test_every_documented_metric_is_on_its_process_with_its_type_and_labels(
    watched: Watched,
) -> None:
    """README "Observability" lists each metric with its labels and the process exporting it
    (queue wait on the executor, time to first chunk and answer time on the worker, 1 ms to
    5 min). Guard: each is there, typed and labelled as documented, after one streamed chat."""
    await chat(watched)
    scraped = await until(lambda: _have_series(watched), "the worker never reported stream lag")
    wrong = []
    for process, name, kind, labels in DOCUMENTED:
        family = scraped[process].get(name)
        if family is None:
            wrong.append(f"{process}: no {name}")
        elif family.type != kind or not labels <= family.labels:
            wrong.append(f"{process}: {name} is {family.type} {sorted(family.labels)}")
    assert not wrong, wrong
    for process, name in (
        ("worker", "orchestrator_answer_seconds"),
        ("executor", "orchestrator_queue_wait_seconds"),
    ):
        bounds = {
            float(dict(labels)["le"])
            for (sample, labels), _ in scraped[process][name].samples.items()
            if sample.endswith("_bucket")
        }
        assert min(bounds) == 0.001, bounds
        assert max(b for b in bounds if b != float("inf")) == 300, bounds


# --- alerts and dashboard: every metric and label they name is one a process exports ---

ADDED_BY_PROMETHEUS = {
    "namespace",
    "job",
    "pod",
    "instance",
    "service",
    "container",
    "endpoint",
    "le",
}
# Litestar's middleware makes this family at the first 5xx (seen with Redis down: labels
# app_name, method, path, status_code), so a healthy scrape cannot show it.
CREATED_ON_FIRST_ERROR = {"orchestrator_http_requests_error_total"}
PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "count",
    "avg",
    "rate",
    "increase",
    "by",
    "without",
    "on",
    "unless",
    "or",
    "and",
    "histogram_quantile",
    "clamp_min",
    "round",
    "topk",
    "vector",
    "absent",
    "label_replace",
    "label_values",
    "up",
    "ignoring",
    "group_left",
    "offset",
}


def _expressions() -> list[str]:
    alerts = (ROOT / "charts/agent-orchestrator/files/alerts.yaml").read_text()
    found = list(re.findall(r"expr: \|\n((?:\s{10,}.*\n)+)", alerts))
    dashboard = json.loads(
        (ROOT / "charts/agent-orchestrator/dashboards/agent-orchestrator.json").read_text()
    )

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                if key in ("expr", "query") and isinstance(item, str):
                    found.append(item)
                else:
                    walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return found


def _named(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses (Helm and Grafana templating removed)."""
    expr = re.sub(r"\{\{.*?\}\}", "", expr)
    expr = re.sub(r"\$\w+|\[[^\]]*\]|\"[^\"]*\"", "", expr)
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|on|without)\s*\(([^)]*)\)", expr):
        labels |= {part.strip() for part in group.split(",") if part.strip()}
    for matcher in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matcher))
    metrics = set(re.findall(r"\b(orchestrator_[a-z_]+)\b", expr))
    return metrics, labels


async def test_alerts_and_dashboard_name_only_exported_metrics_and_labels(
    watched: Watched,
) -> None:
    """An SRE's alert or panel on a name or label no process exports is silently empty. Guard:
    every `orchestrator_*` series and every label the alert rules and dashboard use is in a
    real scrape of api, worker and executor (labels Prometheus adds aside)."""
    await chat(watched)
    scraped = await until(lambda: _have_series(watched), "the worker never reported stream lag")
    exported: dict[str, set[str]] = {}
    for families in scraped.values():
        for family in families.values():
            for sample, labels in family.samples:
                exported.setdefault(sample, set()).update(k for k, _ in labels)
    missing = []
    for expr in _expressions():
        metrics, labels = _named(expr)
        for metric in metrics - CREATED_ON_FIRST_ERROR:
            if metric not in exported:
                missing.append(f"{metric} (in {expr.strip()[:80]})")
                continue
        metrics -= CREATED_ON_FIRST_ERROR
        have = set().union(*(exported.get(m, set()) for m in metrics)) if metrics else set()
        for label in labels - ADDED_BY_PROMETHEUS - PROMQL_WORDS:
            if metrics and label not in have:
                missing.append(f"label {label} of {sorted(metrics)}")
    assert not missing, missing


# --- metrics move when the documented thing happens ---


async def test_socket_gauge_and_frame_counters_move_with_a_socket(watched: Watched) -> None:
    """README: `orchestrator_websocket_connections` (the HPA gauge) and
    `orchestrator_websocket_messages_total{direction}`. Guard: opening a socket adds one,
    a `ping` counts one frame in and one out (its `pong`), closing takes the socket off."""
    port = watched.api.metrics_port
    before = scrape(port)
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(watched.api.ws_url, tenant, session)
    opened = scrape(port)
    assert (
        value(opened, "orchestrator_websocket_connections")
        == value(before, "orchestrator_websocket_connections") + 1
    )
    sent_in = value(opened, "orchestrator_websocket_messages_total", direction="in")
    sent_out = value(opened, "orchestrator_websocket_messages_total", direction="out")
    await ws.send(json.dumps({"type": "ping"}))
    assert (await next_event(ws))["type"] == "pong"
    pinged = scrape(port)
    assert value(pinged, "orchestrator_websocket_messages_total", direction="in") == sent_in + 1
    assert value(pinged, "orchestrator_websocket_messages_total", direction="out") >= sent_out + 1
    await ws.close()
    await until(
        lambda: (
            value(scrape(port), "orchestrator_websocket_connections")
            == value(before, "orchestrator_websocket_connections")
        ),
        "a closed socket stayed on the gauge",
    )


async def test_a_socket_send_refused_by_the_rate_limit_is_counted(watched: Watched) -> None:
    """README: `orchestrator_rate_limit_rejections_total{scope}` counts sends a rate limit
    refused; a socket `chat.send` is a send like the REST one. Guard: the socket's refusal
    (`chat.error` `rate_limited`) moves the `session` series by one."""
    port = watched.api.metrics_port
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(watched.api.ws_url, tenant, session)
    before = value(scrape(port), "orchestrator_rate_limit_rejections_total", scope="session")
    refused = None
    for n in range(PER_SESSION + 1):
        await ws.send(
            json.dumps(
                {
                    "type": "chat.send",
                    "data": {"message": f"m{n}", "stream": False, "request_id": f"r{n}"},
                }
            )
        )
    deadline = time.monotonic() + 15
    while refused is None and time.monotonic() < deadline:
        event = await next_event(ws)
        if event["type"] == "chat.error" and event["data"].get("code") == "rate_limited":
            refused = event
    await ws.close()
    assert refused is not None, "no send was refused"
    assert refused["data"]["details"]["scope"] == "session"
    after = value(scrape(port), "orchestrator_rate_limit_rejections_total", scope="session")
    assert after == before + 1, (before, after)


# --- traces: a message sent on the socket ---


async def test_a_socket_chat_send_is_one_trace_from_the_socket_to_the_answer(
    watched: Watched,
) -> None:
    """README "Traces": one trace per chat message, "HTTP or socket receive → PRODUCER send
    {aes}:actions:<priority> → executor CONSUMER process → ... → worker CONSUMER process → api
    CONSUMER process → websocket send". Existing tests only send by REST. Guard: a socket
    `chat.send` gives one trace holding the api's receive, the executor's and worker's
    CONSUMER spans and the final `websocket send`, and its log line carries that trace id."""
    w = watched
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(w.api.ws_url, tenant, session)
    await ws.send(
        json.dumps({"type": "chat.send", "data": {"message": "socket trace", "request_id": "r-1"}})
    )
    events = await events_until(ws, lambda e: e["type"] in ("chat.response", "chat.error"))
    await ws.close()
    assert events[-1]["type"] == "chat.response", events[-1]
    task_id = events[-1]["task_id"]

    def full() -> list[ReceivedSpan] | None:
        with w.receiver.lock:
            marked = [
                s for s in w.receiver.spans if s.attributes.get("orchestrator.task_id") == task_id
            ]
        if not marked:
            return None
        spans = w.receiver.trace(marked[0].trace_id)
        kinds = {(s.service.rsplit("-", 1)[-1], s.kind) for s in spans}
        wanted = {("executor", "CONSUMER"), ("worker", "CONSUMER"), ("api", "PRODUCER")}
        if wanted <= kinds and any(s.name == "websocket send" for s in spans):
            return spans
        return None

    spans = await until(full, "no trace from the socket's chat.send to the answer")
    assert len({s.trace_id for s in spans}) == 1
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_id or s.parent_id not in ids]
    assert len(roots) == 1, [(r.name, r.kind) for r in roots]
    assert roots[0].service.endswith("api"), roots[0]
    assert any(s.name.startswith("send {aes}:actions:") for s in spans)
    accepted = await until(
        lambda: [
            json.loads(line) for line in w.logs() if task_id in line and "message accepted" in line
        ],
        "no 'message accepted' line for the socket's send",
    )
    assert accepted[0].get("trace_id") == spans[0].trace_id, accepted[0]


# --- logs: JSON, and no secret whatever a client or an outage does ---


async def test_bad_tokens_query_tokens_and_a_database_password_never_reach_a_log(
    watched: Watched,
) -> None:
    """README "Logs": JSON lines; tokens, secrets and message bodies are never logged.
    Guard: after a forged bearer, a valid and a forged `?token=`, and PostgreSQL stopping
    (the writer logs its retry), no log line holds the tokens, the JWT secret or the
    database password, and every line is a JSON object with ts/level/service/msg."""
    w = watched
    tenant, session = unique("t"), unique("s")
    good = token(tenant)
    forged = good[:-6] + "AAAAAA"
    async with httpx.AsyncClient() as http:
        reply = await http.post(
            f"{w.api.url}/api/chat/send",
            json={"message": "x"},
            headers={"Authorization": f"Bearer {forged}"},
        )
        assert reply.status_code == 401
    ws = await websockets.connect(f"{w.api.ws_url}/ws/{tenant}/{session}?token={good}")
    assert json.loads(await ws.recv())["type"] == "connection.ack"
    await ws.close()
    bad = await websockets.connect(f"{w.api.ws_url}/ws/{tenant}/{session}?token={forged}")
    with pytest.raises(websockets.ConnectionClosed):
        await bad.recv()
    w.postgres.stop()
    try:
        await chat(w, message="while postgresql is down")
        await until(
            lambda: any("database unavailable, retrying" in line for line in w.logs()),
            "the writer never logged that PostgreSQL was unavailable (runbook's message)",
        )
        async with httpx.AsyncClient() as http:
            detailed = (await http.get(f"{w.api.url}/health/detailed", timeout=10)).json()
            ready = await http.get(f"{w.api.url}/health/ready", timeout=10)
        assert detailed["components"]["database"]["status"] == "down", detailed
        assert ready.status_code == 200, "PostgreSQL is never a reason to fail readiness"
    finally:
        w.postgres.start()
    lines = w.logs()
    records = [json.loads(line) for line in lines]
    assert all({"ts", "level", "service", "msg"} <= set(r) for r in records)
    text = "\n".join(lines)
    for secret in (good, forged, SECRET, DB_PASSWORD, "while postgresql is down"):
        assert secret not in text, secret[:16]


# --- exemplars: the latency panels' dots open the request's trace ---


@pytest.mark.parametrize(
    ("process", "name"),
    [
        ("worker", "orchestrator_answer_seconds"),
        ("api", "orchestrator_http_request_duration_seconds"),
        ("worker", "orchestrator_time_to_first_chunk_seconds"),
        ("executor", "orchestrator_queue_wait_seconds"),
    ],
)
async def test_latency_panels_exemplars_are_the_traced_requests(
    watched: Watched, process: str, name: str
) -> None:
    """docs/kubernetes.md "Monitoring": "the latency panels query exemplars: each dot carries
    the `trace_id` of a sampled request". After a traced streamed chat, each latency histogram
    has an exemplar naming a received trace (time to first chunk and queue wait had none)."""
    w = watched
    task_id = await chat(w)
    child = w.children[process]

    def traces() -> set[str]:
        with w.receiver.lock:
            return {s.trace_id for s in w.receiver.spans}

    async def settled() -> None:
        # the histogram has seen this chat (its count moved) before its exemplars are judged
        await until(
            lambda: any(
                sample.endswith("_count") and v > 0
                for (sample, _), v in scrape(child.metrics_port)[name].samples.items()
            ),
            f"{name} never observed anything",
        )

    await settled()
    try:
        await until(
            lambda: exemplar_traces(child.metrics_port, name) & traces(),
            "",
            timeout=5,
        )
    except AssertionError:
        pytest.fail(
            f"{process}'s {name}: no exemplar naming a received trace (task {task_id}); "
            f"exemplars seen: {sorted(exemplar_traces(child.metrics_port, name))}"
        )

"""The api's Prometheus metrics. `WEBSOCKET_CONNECTIONS_METRIC` is the HPA metric (DESIGN §7)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.core import task_metrics

WEBSOCKET_CONNECTIONS_METRIC = "orchestrator_websocket_connections"

websocket_connections = Gauge(
    WEBSOCKET_CONNECTIONS_METRIC, "Open WebSocket connections on this pod (the HPA metric)"
)
websocket_messages = Counter(
    "orchestrator_websocket_messages",
    "WebSocket frames received from and sent to clients",
    ["direction"],
)
websocket_refusals = Counter(
    "orchestrator_websocket_refusals",
    "WebSocket handshakes refused or sockets closed by policy",
    ["reason"],
)
tasks_submitted = Counter(
    "orchestrator_tasks_submitted", "Chat messages accepted and enqueued", ["priority"]
)
tasks = task_metrics.tasks

HTTP_METRICS_PREFIX = "orchestrator_http"
"""Litestar's Prometheus middleware names its metrics `orchestrator_http_requests_total`,
`orchestrator_http_request_duration_seconds`, `orchestrator_http_requests_in_progress` and
`orchestrator_http_requests_error_total` (labels method, path template, status_code)."""
HTTP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

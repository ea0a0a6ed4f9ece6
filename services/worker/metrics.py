"""The worker's Prometheus metrics (DESIGN §7) and the one place that records them.

Tenant labels are bounded: the first `ORCHESTRATOR_METRICS_TENANT_LABELS` tenants a process
sees get a label of their own, every later one is counted as `~other`, so a large installation
cannot blow up the series count.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.core import clock, task_metrics
from services.core.actions import (
    Callback,
    ExecutionCallback,
    ExecutionChunk,
    ExecutionCompleted,
    ExecutionFailed,
    Usage,
)
from services.core.metric_buckets import LATENCY_BUCKETS
from services.core.tasks import Outcome, Verdict

callbacks_handled = Counter(
    "orchestrator_callbacks", "Callbacks handled by the worker, by verdict", ["verdict"]
)
tasks = task_metrics.tasks
late_callbacks = Counter(
    "orchestrator_late_callbacks",
    "Callbacks dropped because their task was final, their attempt superseded, or their task "
    "unknown (expired, erased with its session, or named wrongly)",
    ["reason"],
)
# The verdicts counted as late callbacks. `unknown` too: an answer for a task that expired, was
# erased, or that names another tenant's or session's task (an AES bug) was dropped unseen.
LATE = (Verdict.final, Verdict.stale, Verdict.unknown)
time_to_first_chunk = Histogram(
    "orchestrator_time_to_first_chunk_seconds",
    "From accepting a message to its first streamed chunk",
    ["tier"],
    buckets=LATENCY_BUCKETS,
)
answer_time = Histogram(
    "orchestrator_answer_seconds",
    "From accepting a message to its final answer",
    ["tier"],
    buckets=LATENCY_BUCKETS,
)
usage_tokens = Counter(
    "orchestrator_usage_tokens", "Tokens reported by the AES", ["tenant", "direction"]
)
usage_cost = Counter("orchestrator_usage_cost", "Cost reported by the AES", ["tenant"])
stream_lag = Gauge(
    "orchestrator_stream_lag", "Entries not yet read by the group", ["stream", "group"]
)
stream_pending = Gauge(
    "orchestrator_stream_pending", "Entries read but not yet acknowledged", ["stream", "group"]
)
timeouts = Counter("orchestrator_task_timeouts", "Tasks that reached their deadline unfinished")
retries = Counter("orchestrator_task_retries", "Attempts dispatched again after a failure")


OTHER_TENANTS = "~other"  # not a valid tenant id: a tenant named `other` keeps its own series


class TenantLabels:
    """Bounded tenant label values: the first `limit` tenants seen, then `~other`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.known: set[str] = set()

    def __call__(self, tenant_id: str) -> str:
        if tenant_id in self.known:
            return tenant_id
        if len(self.known) < self.limit:
            self.known.add(tenant_id)
            return tenant_id
        return OTHER_TENANTS


def observe(
    action: Callback,
    outcome: Outcome,
    retried: bool,
    exemplar: dict[str, str] | None = None,
    applied_at: float | None = None,
) -> None:
    """Record what one applied (or dropped) callback means for the task metrics.

    `applied_at` (epoch seconds): when the effect was sent to Redis; its reply may come back
    much later (see `PartitionConsumer._queue_read_ahead`), the client had the event then.
    """
    if outcome.verdict in LATE:
        if not outcome.replay:  # a redelivery of what ended the task is not the AES's lateness
            late_callbacks.labels(outcome.verdict.value).inc()
        return
    if outcome.verdict is not Verdict.ok:
        return
    tier = outcome.tier or "unknown"
    now = clock.now() if applied_at is None else applied_at
    elapsed = now - outcome.created_ms / 1000 if outcome.created_ms else None
    if isinstance(action, ExecutionChunk):
        if outcome.first_chunk and elapsed is not None:
            time_to_first_chunk.labels(tier).observe(elapsed, exemplar)
        return
    completed = isinstance(action, ExecutionCompleted) or (
        isinstance(action, ExecutionCallback) and action.status == "completed"
    )
    if completed:
        tasks.labels("completed", tier).inc()
        if elapsed is not None:
            answer_time.labels(tier).observe(elapsed, exemplar)
    elif isinstance(action, ExecutionFailed | ExecutionCallback):
        tasks.labels("queued" if retried else "failed", tier).inc()


def observe_usage(labels: TenantLabels, tenant_id: str, usage: Usage) -> None:
    tenant = labels(tenant_id)
    usage_tokens.labels(tenant, "input").inc(usage.input_tokens)
    usage_tokens.labels(tenant, "output").inc(usage.output_tokens)
    usage_cost.labels(tenant).inc(usage.cost)

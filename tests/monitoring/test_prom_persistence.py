"""The persistence alerts, and the routing labels of every alert, in a real Prometheus.

Needs the `prometheus` binary (Debian's package, which `make test` installs). Each test has
its own Valkey, PostgreSQL, api, worker (with its persistence writer) and executor, scraped and
evaluated every second, with the chart's rendered rules. As in test_prom_faults.py, a test
checks that an alert's condition holds (pending, with labels and annotations rendered), never
waits out a `for:`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import promql_parser
import pytest
from redis import Redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child, LocalStack
from services.core import keys
from services.persistence.migrate import migrate
from tests.e2e.conftest import new_stack
from tests.monitoring.prom import SERVICE_OF, Prometheus, rendered, targets_of
from tests.monitoring.test_prom_faults import active, assert_rendered, chat

pytestmark = pytest.mark.e2e

NAMESPACE = "chat"  # tests/chart/conftest.py's, which prom.py renders with
WRITE_FAILING = "OrchestratorPersistenceWriteFailing"
BACKLOG = "OrchestratorPersistenceBacklog"
ROUTING_LABELS = ("namespace", "job")
"""What Alertmanager routes on: the namespace, and the job, which names the release's Service
(`<release>-agent-orchestrator-<component>`), so two releases in one namespace stay apart."""


@dataclass
class Persisting:
    redis: RedisServer
    postgres: PostgresServer
    stack: LocalStack
    api: Child
    prometheus: Prometheus

    def child(self, role: str) -> Child:
        return next(child for child in self.stack.children if child.role == role)


@pytest.fixture
def persisting(tmp_path: Path) -> Iterator[Persisting]:
    """A fresh deployment with persistence on (migrated PostgreSQL), scraped by a fresh
    Prometheus, quiet and healthy at first."""
    redis = RedisServer().start()
    postgres = PostgresServer(durable=False).start()
    stack = new_stack(
        redis,
        tmp_path / "logs",
        database_url=postgres.url(),
        executor_chunk_delay_ms="1",
        max_websocket_connections="10",
        retry_backoff_seconds="0.05",
        retry_backoff_max_seconds="0.1",
        persist_retry_max_seconds="0.5",  # retries while PostgreSQL is away: several a scrape
    )
    prometheus = Prometheus(rendered())
    try:
        asyncio.run(migrate(postgres.url()))
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        prometheus.start(targets_of(stack.children))
        yield Persisting(redis, postgres, stack, api, prometheus)
    finally:
        prometheus.stop()
        stack.stop()
        postgres.cleanup()
        redis.cleanup()


def value(prometheus: Prometheus, expr: str) -> float | None:
    """The single sample of `expr` now, None when it has none."""
    result = prometheus.query(expr)
    assert len(result) <= 1, (expr, result)
    return float(result[0]["value"][1]) if result else None


def test_healthy_persisting_deployment_raises_no_persistence_alert(
    persisting: Persisting,
) -> None:
    """A task answered and its record written, then idle: both persistence rules evaluate
    cleanly and neither is pending (nor is any other alert). Fails without the rules for the
    rules' absence. Needs prometheus."""
    prometheus = persisting.prometheus
    asyncio.run(chat(persisting.api, [{}]))
    written = (
        f'sum(orchestrator_persistence_records_total{{namespace="{NAMESPACE}", outcome="written"}})'
    )
    backlog = f'max(orchestrator_persistence_backlog{{job="{SERVICE_OF["worker"]}"}})'
    prometheus.wait(lambda: (value(prometheus, written) or 0) >= 1, "the record written")
    prometheus.wait(lambda: value(prometheus, backlog) == 0, "the backlog reported empty")
    prometheus.scraped_after(time.time() + 2)
    health = {name: (state, error) for name, state, error in prometheus.rule_health()}
    assert health.get(WRITE_FAILING) == ("ok", ""), health
    assert health.get(BACKLOG) == ("ok", ""), health
    assert prometheus.alerts() == []


async def read_only(postgres: PostgresServer) -> None:
    """PostgreSQL up but refusing every write (SQLSTATE 25006), as on a demoted primary or a
    database an operator made read-only; a reload applies it to the writer's open sessions."""
    conn = await asyncpg.connect(postgres.url())
    try:
        await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


FAULTS: dict[str, Callable[[PostgresServer], None]] = {
    "stopped": lambda postgres: postgres.stop(),
    "read-only": lambda postgres: asyncio.run(read_only(postgres)),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_postgresql_refusing_writes_raises_the_persistence_alerts(
    persisting: Persisting, fault: str
) -> None:
    """PostgreSQL stopped, or up and read-only, while a chat goes on: the answer still reaches
    the client, the writer keeps failing on its record, and both persistence rules hold
    (pending) for the worker's job in the release's namespace, their counts rendered (one pod
    cannot write; one task waits). Needs prometheus."""
    prometheus = persisting.prometheus
    prometheus.scraped_after(time.time() + 1)  # the failure counter's 0 is on record
    FAULTS[fault](persisting.postgres)
    asyncio.run(chat(persisting.api, [{}]))  # answered: persistence is off the message path
    failures = f'sum(orchestrator_persistence_write_failures_total{{namespace="{NAMESPACE}"}})'
    prometheus.wait(lambda: (value(prometheus, failures) or 0) >= 2, "the writer failing")
    prometheus.wait(
        lambda: bool(active(prometheus, WRITE_FAILING)) and bool(active(prometheus, BACKLOG)),
        f"{WRITE_FAILING} and {BACKLOG} pending",
    )
    (failing,) = active(prometheus, WRITE_FAILING)
    (backlog,) = active(prometheus, BACKLOG)
    for alert in (failing, backlog):
        assert_rendered(alert)
        assert alert["labels"]["namespace"] == NAMESPACE, alert
        assert alert["labels"]["job"] == SERVICE_OF["worker"], alert
    assert failing["labels"]["severity"] == "critical", failing
    assert failing["annotations"]["summary"].startswith("1 worker pod(s) of "), failing
    assert backlog["annotations"]["summary"].startswith("1 finished tasks wait"), backlog


def _nodes(expr: Any) -> list[Any]:
    nodes: list[Any] = []
    promql_parser.walk(expr, nodes.append)
    return nodes


def _dropped(node: Any) -> list[str]:
    """The routing labels an aggregation (`by`/`without`) or a vector matching (`on`/
    `ignoring`) leaves out of its result, or of what it matches on."""
    if isinstance(node, promql_parser.AggregateExpr):
        modifier = node.modifier
        if modifier is None:  # sum(...): no label survives
            return list(ROUTING_LABELS)
        keeps = modifier.type == promql_parser.AggModifierType.By
        labels = list(modifier.labels)
    elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
        matching = node.modifier.matching
        if matching is None:
            return []
        keeps = matching.type == promql_parser.LabelModifierType.Include  # on (...)
        labels = list(matching.labels)
    else:
        return []
    if keeps:
        return [label for label in ROUTING_LABELS if label not in labels]
    return [label for label in ROUTING_LABELS if label in labels]


def test_every_alert_aggregates_by_the_routing_labels() -> None:
    """Every aggregation of every rule keeps `namespace` and `job` (`sum(...)` or
    `max by (stream, group)` dropped them, so Alertmanager could not route by namespace when
    releases share a Prometheus), and every `on (...)` matches on them."""
    problems = [
        f"{name}: {node} drops {dropped}"
        for name, rule in rendered().alerts().items()
        for node in _nodes(promql_parser.parse(rule["expr"]))
        if (dropped := _dropped(node))
    ]
    assert not problems, "\n".join(problems)


def test_alerts_raised_by_real_faults_carry_the_routing_labels(persisting: Persisting) -> None:
    """The executor stopped while messages come in (its job down, the AES's actions waiting)
    and a malformed callback (dead-lettered): every alert Prometheus raises, whatever its
    expression (`absent()` of a comparison has no labels of its own), names the release's
    namespace and job. Needs prometheus."""
    prometheus = persisting.prometheus
    asyncio.run(chat(persisting.api, [{}]))  # the executor's group exists
    persisting.stack.stop_child(persisting.child("executor"))
    asyncio.run(chat(persisting.api, [{}] * 8, wait=False))
    with Redis.from_url(persisting.redis.url) as redis:
        redis.xadd(keys.callback_stream(0), {"junk": "1"})
    expected = {"OrchestratorComponentDown", "OrchestratorStreamLag", "OrchestratorDeadLetters"}

    def raised() -> set[str]:
        return {a["labels"]["alertname"] for a in prometheus.alerts()}

    prometheus.wait(lambda: expected <= raised(), f"{sorted(expected)} raised", 40)
    for alert in prometheus.alerts():
        assert_rendered(alert)
        labels = alert["labels"]
        assert labels.get("namespace") == NAMESPACE, alert
        assert labels.get("job", "").startswith(f"{SERVICE_OF['api'].rsplit('-', 1)[0]}-"), alert

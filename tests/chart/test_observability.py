"""What SREs look at queries what the code exports, and every alert says what to do.

Every PromQL expression the bundle ships (the Grafana dashboard's panels and variables, the
alert rules as Helm renders them into the PrometheusRule, the KEDA trigger, the
prometheus-adapter's series queries) is parsed with a real PromQL parser (`promql-parser`) and
its vector selectors are checked against the code's Prometheus registries: each scraped process
(api, worker, executor) imports its metric modules in a fresh interpreter (the api and the
worker both define `orchestrator_tasks`, so one registry cannot hold both) and reports every
collector of `prometheus_client.REGISTRY`, with the series names the exposition gives them
(a counter's `_total` and `_created`, a histogram's `_bucket`, `_count`, `_sum`, `_created`).
The api's HTTP metrics are created by Litestar's Prometheus middleware on the first request:
the same middleware class is asked for them with the api's prefix.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import promql_parser
import pytest
import yaml
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from services.api.metrics import WEBSOCKET_CONNECTIONS_METRIC
from services.core.telemetry import exemplar
from tests.chart.conftest import CHART_DIR, NAMESPACE, ROOT, Rendered

DASHBOARDS = sorted((CHART_DIR / "dashboards").glob("*.json"))
ADAPTER = ROOT / "k8s" / "prometheus-adapter.yaml"

# The modules whose import registers a process's metrics (the process's entry module included,
# so that a metric defined anywhere it imports is seen).
PROCESS_MODULES = {
    "api": (
        "services.cli.serve_api",
        "services.api.app",
        "services.api.metrics",
        "services.api.admission",
    ),
    "worker": ("services.worker.main", "services.worker.metrics", "services.persistence.writer"),
    "executor": ("services.executor.main",),
}
# The series names the text exposition gives each family type.
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "gauge": ("",),
    "stateset": ("",),
    "unknown": ("",),
}
# Labels Prometheus adds to every scraped series (Prometheus Operator ServiceMonitor targets);
# the ServiceMonitor's own relabelings are read from the rendered object.
TARGET_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}
GRAFANA_INTERVAL = re.compile(r"\[\$\{?__\w+\}?\]")

_EXPORT = r"""
import importlib, json, sys
from prometheus_client import REGISTRY

for module in sys.argv[1:]:
    importlib.import_module(module)
if "services.api.app" in sys.argv[1:]:
    from litestar import Request
    from litestar.plugins.prometheus import PrometheusConfig
    from services.api import metrics

    config = PrometheusConfig(
        prefix=metrics.HTTP_METRICS_PREFIX, group_path=True, buckets=list(metrics.HTTP_BUCKETS)
    )
    middleware = config.middleware_class(app=None, config=config)
    request = Request({
        "type": "http", "method": "GET", "path": "/x", "path_template": "/x", "headers": [],
        "query_string": b"", "server": ("api", 8000), "scheme": "http", "root_path": "",
        "app": None, "state": {},
    })
    labels = {**middleware._get_default_labels(request), **middleware._get_extra_labels(request)}
    for factory in (
        middleware.request_count,
        middleware.request_time,
        middleware.requests_in_progress,
        middleware.requests_error_count,
    ):
        factory(labels)
families = []
for collector in list(REGISTRY._collector_to_names):
    labels = list(getattr(collector, "_labelnames", ()))
    for family in collector.collect():
        families.append({"name": family.name, "type": family.type, "labels": labels})
print(json.dumps(families))
"""


@dataclass
class Exported:
    """One series name the code exposes: its family, type, labels and the processes exposing it."""

    family: str
    type: str
    labels: set[str] = field(default_factory=set)
    processes: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def exported() -> dict[str, Exported]:
    running = {
        process: subprocess.Popen(
            [sys.executable, "-c", _EXPORT, *modules],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process, modules in PROCESS_MODULES.items()
    }
    series: dict[str, Exported] = {}
    for process, child in running.items():
        stdout, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, f"importing the {process}'s metrics failed:\n{stderr}"
        for family in json.loads(stdout):
            for suffix in SERIES_SUFFIXES[family["type"]]:
                entry = series.setdefault(
                    family["name"] + suffix, Exported(family["name"], family["type"])
                )
                entry.labels |= set(family["labels"]) | ({"le"} if suffix == "_bucket" else set())
                entry.processes.add(process)
    # Prometheus's own series of every scraped target (1 when the scrape succeeded): what says
    # that a component is down, since a process that is down exports nothing of its own.
    series["up"] = Exported("up", "gauge", processes=set(PROCESS_MODULES))
    return series


@dataclass(frozen=True)
class Query:
    where: str
    expr: str


def _dashboard_queries(dashboard: dict[str, Any], name: str) -> Iterator[Query]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = GRAFANA_INTERVAL.sub("[5m]", target["expr"])
            yield Query(f"{name}: panel {panel['title']!r} {target['refId']}", expr)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text.strip())
        assert match, f"{name}: variable {variable['name']}: not a label_values() query"
        # The label must exist on the series: checked as a matcher of the selector.
        yield Query(f"{name}: variable {variable['name']}", f'{match[1]}{{{match[2]}!=""}}')


def _dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, json.loads(path.read_text())) for path in DASHBOARDS]


def _alerts(rendered: Rendered) -> list[dict[str, Any]]:
    (rule,) = rendered.of_kind("PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def _queries(rendered: Rendered) -> list[Query]:
    queries = [q for name, d in _dashboards() for q in _dashboard_queries(d, name)]
    for alert in _alerts(rendered):
        queries.append(Query(f"alert {alert['alert']}", alert["expr"]))
    for scaled in rendered.of_kind("ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                name = scaled["metadata"]["name"]
                queries.append(Query(f"ScaledObject {name}", trigger["metadata"]["query"]))
    adapter = next(d for d in yaml.safe_load_all(ADAPTER.read_text()) if d)
    for kind in ("custom", "external"):
        for rule in adapter["rules"].get(kind, []):
            queries.append(Query(f"prometheus-adapter {kind} rule", rule["seriesQuery"]))
    return queries


def _nodes(expr: Any) -> list[Any]:
    nodes: list[Any] = []
    promql_parser.walk(expr, nodes.append)
    return nodes


def _metric_name(selector: Any) -> str:
    if selector.name:
        return str(selector.name)
    for matcher in selector.matchers.matchers:
        if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
            return str(matcher.value)
    raise AssertionError(f"{selector}: a selector without a metric name")


def _selectors(expr: Any) -> list[Any]:
    return [n for n in _nodes(expr) if isinstance(n, promql_parser.VectorSelector)]


@pytest.fixture(scope="module")
def production(all_rendered: dict[str, Rendered]) -> Rendered:
    """Prometheus Operator and KEDA known to Helm: PrometheusRule and ScaledObjects render."""
    return all_rendered["production"]


@pytest.fixture(scope="module")
def parsed(production: Rendered) -> list[tuple[Query, Any]]:
    result = []
    for query in _queries(production):
        try:
            result.append((query, promql_parser.parse(query.expr)))
        except Exception as exc:  # the parser raises a bare ValueError/RuntimeError
            pytest.fail(f"{query.where}: not valid PromQL ({exc}): {query.expr}")
    return result


@pytest.fixture(scope="module")
def target_labels(production: Rendered) -> set[str]:
    (monitor,) = production.of_kind("ServiceMonitor")
    relabeled = {
        relabeling["targetLabel"]
        for endpoint in monitor["spec"]["endpoints"]
        for relabeling in endpoint.get("relabelings", [])
    }
    return TARGET_LABELS | relabeled


def test_the_bundle_ships_promql_for_every_surface(parsed: list[tuple[Query, Any]]) -> None:
    kinds = {query.where.split(":")[0].split(" ")[0] for query, _ in parsed}
    assert {"agent-orchestrator.json", "alert", "ScaledObject", "prometheus-adapter"} <= kinds
    assert len(parsed) >= 40


def test_every_queried_metric_is_exported_by_the_code(
    parsed: list[tuple[Query, Any]], exported: dict[str, Exported]
) -> None:
    unknown = [
        f"{query.where}: {_metric_name(selector)}"
        for query, expr in parsed
        for selector in _selectors(expr)
        if _metric_name(selector) not in exported
    ]
    assert not unknown, "metric names no process exports:\n" + "\n".join(unknown)


def test_queried_labels_exist_on_their_series(
    parsed: list[tuple[Query, Any]], exported: dict[str, Exported], target_labels: set[str]
) -> None:
    """A matcher or a `by` on a label the series never has silently selects nothing."""
    problems = []
    for query, expr in parsed:
        for selector in _selectors(expr):
            series = exported.get(_metric_name(selector))
            if series is None:
                continue  # reported by the test above
            for matcher in selector.matchers.matchers:
                if matcher.name != "__name__" and matcher.name not in series.labels | target_labels:
                    problems.append(f"{query.where}: {series.family} has no label {matcher.name}")
        for node in _nodes(expr):
            if not isinstance(node, promql_parser.AggregateExpr) or node.modifier is None:
                continue
            if node.modifier.type != promql_parser.AggModifierType.By:
                continue
            available = set(target_labels)
            for selector in _selectors(node.expr):
                series = exported.get(_metric_name(selector))
                available |= series.labels if series else set()
            missing = set(node.modifier.labels) - available
            if missing:
                problems.append(f"{query.where}: {node.op} by {sorted(missing)}: no such label")
    assert not problems, "\n".join(problems)


def test_queries_scoped_to_one_component_use_that_components_metrics(
    parsed: list[tuple[Query, Any]], exported: dict[str, Exported], production: Rendered
) -> None:
    """`job` / `service` is the scraped Service: a metric of another process never matches."""
    components = {
        service["metadata"]["name"]: service["metadata"]["labels"]["app.kubernetes.io/component"]
        for service in production.of_kind("Service")
    }
    wrong = []
    for query, expr in parsed:
        for selector in _selectors(expr):
            series = exported.get(_metric_name(selector))
            for matcher in selector.matchers.matchers:
                if matcher.name not in ("job", "service") or series is None:
                    continue
                if matcher.op != promql_parser.MatchOp.Equal:
                    continue
                component = components.get(matcher.value)
                assert component, f"{query.where}: {matcher.name}={matcher.value!r} is no Service"
                if component not in series.processes:
                    wrong.append(f"{query.where}: {series.family} is not exported by {component}")
    assert not wrong, "\n".join(wrong)


def test_every_metric_the_code_exports_is_on_the_dashboard(
    parsed: list[tuple[Query, Any]], exported: dict[str, Exported]
) -> None:
    """A metric nobody can see is a metric nobody watches: each family has a panel."""
    on_dashboard = {
        exported[_metric_name(s)].family
        for query, expr in parsed
        if ".json:" in query.where
        for s in _selectors(expr)
        if _metric_name(s) in exported
    }
    families = {e.family for e in exported.values() if e.family.startswith("orchestrator_")}
    assert families - on_dashboard == set(), "add panels for these metrics"


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _panel_selectors(panel: dict[str, Any]) -> set[str]:
    names = set()
    for target in panel.get("targets", []):
        expr = promql_parser.parse(GRAFANA_INTERVAL.sub("[5m]", target["expr"]))
        names |= {_metric_name(s) for s in _selectors(expr)}
    return names


def _quantile_panels(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """histogram family -> a panel that draws histogram_quantile over its _bucket series."""
    result = {}
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = promql_parser.parse(GRAFANA_INTERVAL.sub("[5m]", target["expr"]))
            for node in _nodes(expr):
                if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
                    for selector in _selectors(node.args[1]):
                        name = _metric_name(selector)
                        if name.endswith("_bucket"):
                            result[name.removesuffix("_bucket")] = panel
    return result


@pytest.mark.parametrize(("name", "dashboard"), _dashboards())
def test_dashboard_shows_connections_throughput_errors_lag_and_tier_usage(
    name: str, dashboard: dict[str, Any]
) -> None:
    used = set().union(*(_panel_selectors(p) for p in _panels(dashboard)))
    assert WEBSOCKET_CONNECTIONS_METRIC in used, "connections"
    assert {"orchestrator_tasks_submitted_total", "orchestrator_tasks_total"} <= used, "throughput"
    assert {"orchestrator_http_requests_total", "orchestrator_dead_letters_total"} <= used
    assert {"orchestrator_stream_lag", "orchestrator_stream_pending"} <= used, "lag"
    by_tier = [
        panel["title"]
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        for node in _nodes(promql_parser.parse(GRAFANA_INTERVAL.sub("[5m]", target["expr"])))
        if isinstance(node, promql_parser.AggregateExpr)
        and node.modifier is not None
        and "tier" in node.modifier.labels
        and "orchestrator_tasks_total" in {_metric_name(s) for s in _selectors(node.expr)}
    ]
    assert by_tier, "per-tier usage"
    errors = [
        t["expr"]
        for p in _panels(dashboard)
        for t in p.get("targets", [])
        if 'status_code=~"5.."' in t["expr"]
    ]
    assert errors, "5xx errors"


@pytest.mark.parametrize(("name", "dashboard"), _dashboards())
def test_every_exported_histogram_has_a_percentile_panel(
    name: str, dashboard: dict[str, Any], exported: dict[str, Exported]
) -> None:
    histograms = {e.family for e in exported.values() if e.type == "histogram"}
    quantiles = _quantile_panels(dashboard)
    assert histograms <= set(quantiles), (
        f"no histogram_quantile panel: {histograms - set(quantiles)}"
    )
    for family in histograms:
        panel = quantiles[family]
        quantile_values = {
            float(m)
            for t in panel["targets"]
            for m in re.findall(r"histogram_quantile\(([0-9.]+)", t["expr"])
        }
        assert {0.5, 0.95, 0.99} <= quantile_values, f"{panel['title']}: p50, p95 and p99"


@pytest.mark.parametrize(("name", "dashboard"), _dashboards())
def test_latency_panels_link_exemplars_to_their_trace_in_tempo(
    name: str, dashboard: dict[str, Any]
) -> None:
    span = NonRecordingSpan(
        SpanContext(
            trace_id=1, span_id=2, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)
        )
    )
    (trace_label,) = exemplar(span) or {}  # the label the code puts on its exemplars
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    tempo = [v for v in variables.values() if v["type"] == "datasource" and v["query"] == "tempo"]
    assert tempo, "a dashboard variable chooses the Tempo data source"
    linked = []
    for family, panel in _quantile_panels(dashboard).items():
        if not any(t.get("exemplar") for t in panel["targets"]):
            continue
        for link in panel["fieldConfig"]["defaults"].get("links", []):
            if f"${{{tempo[0]['name']}}}" in link["url"] and trace_label in link["url"]:
                linked.append(family)
    assert "orchestrator_answer_seconds" in linked, linked
    assert len(linked) >= 2, linked


def test_every_alert_has_a_summary_and_a_runbook(production: Rendered) -> None:
    alerts = _alerts(production)
    assert {a["alert"] for a in alerts} >= {
        "OrchestratorHighErrorRate",
        "OrchestratorStreamLag",
        "OrchestratorDeadLetters",
        "OrchestratorPodNearConnectionCap",
    }
    runbooks = (ROOT / "docs" / "kubernetes.md").read_text()
    for alert in alerts:
        annotations = alert["annotations"]
        assert annotations.get("summary", "").strip(), f"{alert['alert']}: summary"
        assert annotations.get("description", "").strip(), f"{alert['alert']}: description"
        runbook = annotations.get("runbook_url", "")
        assert runbook.startswith("https://"), f"{alert['alert']}: runbook_url"
        anchor = runbook.rsplit("#", 1)[-1]
        assert anchor == alert["alert"].lower()
        assert f"### {alert['alert']}\n" in runbooks, f"docs/kubernetes.md: no runbook {anchor}"
        assert alert["labels"]["severity"] in ("critical", "warning", "info")


def test_alerts_are_scoped_to_the_release_and_fully_rendered(production: Rendered) -> None:
    for alert in _alerts(production):
        assert f'namespace="{NAMESPACE}"' in alert["expr"], "scoped to the release"
        assert "{{" not in alert["expr"], "Helm rendered every template expression"
    cap = next(a for a in _alerts(production) if a["alert"] == "OrchestratorPodNearConnectionCap")
    assert WEBSOCKET_CONNECTIONS_METRIC in cap["expr"]
    assert "0.9 * 5000" in cap["expr"]

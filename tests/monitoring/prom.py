"""A real Prometheus (Debian's `/usr/bin/prometheus`) scraping our real processes, with the
chart's rendered alert rules and dashboard expressions.

The ServiceMonitor is reproduced by a static scrape config whose targets carry the
`__meta_kubernetes_*` labels Kubernetes service discovery would give them and whose relabeling
is the Prometheus Operator's for a ServiceMonitor endpoint (job = Service name, namespace,
service, pod, container, endpoint) plus the chart's own relabeling (component): the rules'
`job=`/`namespace=` selectors then match as they would in a cluster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from services.cli.embedded import free_port, stop_process
from services.cli.stack import Child
from tests.chart.conftest import CHART_DIR, NAMESPACE, PROMETHEUS_OPERATOR_APIS, RELEASE, render

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
SCRAPE_SECONDS = 1
RATE_INTERVAL = "15s"
"""What Grafana's `$__rate_interval` is with a 1 s scrape interval on the data source and a
short step: at least four scrapes."""
FULLNAME = f"{RELEASE}-agent-orchestrator"
SERVICE_OF = {
    "api": f"{FULLNAME}-api",
    "worker": f"{FULLNAME}-worker-metrics",
    "executor": f"{FULLNAME}-executor-metrics",
}
"""The Service that carries each component's `metrics` port (api-service.yaml,
metrics-services.yaml): the Operator names the job after it."""

BASE_VALUES: dict[str, Any] = {
    "executor": {"enabled": True},
    "config": {"maxWebsocketConnections": 10},
    "api": {"autoscaling": {"targetConnectionsPerPod": 8}},
    "monitoring": {"prometheusRule": {"streamLag": 5}},
}
"""`maxWebsocketConnections` and `streamLag` small enough for a test to reach (both are chart
values; the `for:` durations are not: the template has no value for them)."""


@dataclass
class Monitoring:
    """The chart's rendered PrometheusRule spec and Grafana dashboard."""

    values: dict[str, Any]
    rules: dict[str, Any]
    dashboard: dict[str, Any]

    def alerts(self) -> dict[str, dict[str, Any]]:
        return {
            rule["alert"]: rule
            for group in self.rules["groups"]
            for rule in group["rules"]
            if "alert" in rule
        }

    def panel_targets(self) -> Iterable[tuple[str, str, str]]:
        """(panel title, PromQL with Grafana's variables filled in, legend format)."""
        for panel in self.dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$namespace", NAMESPACE)
                expr = expr.replace("$__rate_interval", RATE_INTERVAL)
                yield panel["title"], expr, target.get("legendFormat") or ""


def rendered(values: dict[str, Any] | None = None) -> Monitoring:
    """Render the chart as release `ao` in namespace `chat` with the Operator's APIs known."""
    merged = _merge(BASE_VALUES, values or {})
    manifests = render(merged, PROMETHEUS_OPERATOR_APIS)
    rules: dict[str, Any] | None = None
    dashboard: dict[str, Any] | None = None
    for path, text in manifests.items():
        if path.endswith("prometheusrule.yaml"):
            rules = yaml.safe_load(text)["spec"]
        if path.endswith("dashboard.yaml"):
            data = yaml.safe_load(text)["data"]
            dashboard = json.loads(data["agent-orchestrator.json"])
    assert rules is not None, sorted(manifests)
    assert dashboard is not None, sorted(manifests)
    assert (CHART_DIR / "dashboards" / "agent-orchestrator.json").exists()
    return Monitoring(merged, rules, dashboard)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class Target:
    """One pod's metrics endpoint as Kubernetes discovery would describe it."""

    component: str
    pod: str
    port: int

    def static_config(self) -> dict[str, Any]:
        service = SERVICE_OF[self.component]
        return {
            "targets": [f"127.0.0.1:{self.port}"],
            "labels": {
                "__meta_kubernetes_namespace": NAMESPACE,
                "__meta_kubernetes_service_name": service,
                "__meta_kubernetes_pod_name": self.pod,
                "__meta_kubernetes_pod_container_name": self.component,
                "__meta_kubernetes_endpoint_port_name": "metrics",
                "__meta_kubernetes_pod_label_app_kubernetes_io_component": self.component,
            },
        }


def targets_of(children: Iterable[Child]) -> list[Target]:
    """A pod name per process, like `ao-agent-orchestrator-api-<n>`."""
    return [
        Target(child.role, f"{FULLNAME}-{child.role}-{child.process.pid}", child.metrics_port or 0)
        for child in children
    ]


# The Prometheus Operator's relabeling of a ServiceMonitor endpoint (no jobLabel: the job is
# the Service's name), then the chart's `relabelings` (servicemonitor.yaml).
OPERATOR_RELABELING: list[dict[str, Any]] = [
    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
    {"target_label": "endpoint", "replacement": "metrics"},
    {
        "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
        "target_label": "component",
    },
]


@dataclass
class Prometheus:
    """`prometheus` on 127.0.0.1, its config, rules and TSDB in a temporary directory."""

    monitoring: Monitoring
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hunt_prom-")))
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, targets: list[Target]) -> None:
        (self.directory / "rules.yaml").write_text(yaml.safe_dump(self.monitoring.rules))
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_SECONDS}s",
                "scrape_timeout": f"{SCRAPE_SECONDS}s",
                "evaluation_interval": f"{SCRAPE_SECONDS}s",
            },
            "rule_files": [str(self.directory / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": "serviceMonitor/chat/ao-agent-orchestrator/0",
                    "honor_labels": False,
                    "static_configs": [target.static_config() for target in targets],
                    "relabel_configs": OPERATOR_RELABELING,
                }
            ],
        }
        (self.directory / "prometheus.yml").write_text(yaml.safe_dump(config))

    def start(self, targets: list[Target]) -> Prometheus:
        assert PROMETHEUS, "prometheus is not installed (apt-get install -y prometheus)"
        self.write_config(targets)
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.directory / "prometheus.log").open("wb"),
        )
        self.wait(lambda: self._get("/-/ready") is not None, "prometheus ready", 20)
        self.wait(lambda: self.active_targets() == len(targets), "targets scraped", 20)
        return self

    def reload(self, targets: list[Target]) -> None:
        """Point the scrape at new pods (a restarted process has new ports)."""
        self.write_config(targets)
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=5):  # noqa: S310
            pass
        self.wait(lambda: self.active_targets() == len(targets), "targets after reload", 20)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        path = self.directory / "prometheus.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def _get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as reply:  # noqa: S310
                body = reply.read()
        except OSError:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return body

    def active_targets(self) -> int:
        answer = self._get("/api/v1/targets", state="active")
        if not isinstance(answer, dict):
            return -1
        return sum(1 for t in answer["data"]["activeTargets"] if t["health"] == "up")

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self._get("/api/v1/query", query=expr)
        assert isinstance(answer, dict), (expr, answer)
        assert answer.get("status") == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts, labels and annotations rendered."""
        answer = self._get("/api/v1/alerts")
        assert isinstance(answer, dict), answer
        alerts: list[dict[str, Any]] = answer["data"]["alerts"]
        return alerts

    def rule_health(self) -> list[tuple[str, str, str]]:
        """(rule, health, lastError) of every rule Prometheus evaluated."""
        answer = self._get("/api/v1/rules")
        assert isinstance(answer, dict), answer
        return [
            (rule["name"], rule["health"], rule.get("lastError", ""))
            for group in answer["data"]["groups"]
            for rule in group["rules"]
        ]

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
        """Poll `condition` (a scrape or an evaluation is a 1 s tick: nothing to await)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.log()}")
            time.sleep(0.2)

    def scraped_after(self, moment: float) -> None:
        """Return once every target was scraped after `moment` (epoch seconds) and the rules
        were evaluated on it."""
        self.wait(
            lambda: bool(self.query(f"min(timestamp(up)) > {moment}")),
            f"a scrape after {moment}",
        )
        self.wait(
            lambda: all(rule_time > moment for rule_time in self.rule_evaluations()),
            "an evaluation after it",
        )

    def rule_evaluations(self) -> list[float]:
        answer = self._get("/api/v1/rules")
        assert isinstance(answer, dict), answer
        return [_epoch(group["lastEvaluation"]) for group in answer["data"]["groups"]]

    def alert_named(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts() if a["labels"]["alertname"] == name]


def _epoch(rfc3339: str) -> float:
    """An RFC 3339 time of the API (nanoseconds, `Z`) as epoch seconds."""
    head, _, rest = rfc3339.partition(".")
    fraction = rest.rstrip("Z").split("+")[0][:6] if rest else "0"
    return datetime.fromisoformat(f"{head}.{fraction:0<6}+00:00").timestamp()

"""`OrchestratorComponentDown` (b4f0417) selects `up` by the job names the chart's own
ServiceMonitor gives its targets (the Services' names). The rule was rendered whenever the
PrometheusRule was, also with `monitoring.serviceMonitor.enabled: false` (a deployment scraped
by its own PodMonitor or scrape config): then no target ever has those job names, and the
critical alert fired 5 minutes after install, for good, with every pod up. The other alerts
only go quiet in that setup; this one pages. Evaluated by `promtool test rules` (Prometheus's
own rule engine) on the rendered rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.chart.conftest import NAMESPACE, PROMETHEUS_OPERATOR_APIS, render

PROMTOOL = shutil.which("promtool")  # Debian's prometheus package, which `make test` installs


def rendered(values: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The PrometheusRule's spec, and whether a ServiceMonitor was rendered."""
    manifests = render(values, PROMETHEUS_OPERATOR_APIS)
    spec: dict[str, Any] | None = None
    monitor = False
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if not document:
                continue
            if document["kind"] == "PrometheusRule":
                spec = document["spec"]
            monitor |= document["kind"] == "ServiceMonitor"
    assert spec is not None
    return spec, monitor


def test_component_down_stays_quiet_with_every_pod_up_without_the_servicemonitor(
    tmp_path: Path,
) -> None:
    spec, monitor = rendered({"monitoring": {"serviceMonitor": {"enabled": False}}})
    assert not monitor
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    # Every api and worker pod up, scraped by the operator's own PodMonitor (job: its name).
    series = [
        {
            "series": f'up{{namespace="{NAMESPACE}", job="{NAMESPACE}/orchestrator", pod="{pod}"}}',
            "values": "1x20",
        }
        for pod in ("api-0", "api-1", "worker-0")
    ]
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "OrchestratorComponentDown", "exp_alerts": []}
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    assert PROMTOOL is not None
    run = subprocess.run(
        [PROMTOOL, "test", "rules", "test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr

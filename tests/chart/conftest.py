"""Render the Helm chart offline with the real Helm SDK, once per value set per test session.

No cluster and no helm binary: `helm-python-sdk` embeds Helm's Go library. The value sets are
the chart's defaults plus the files in `tests/chart/values/`; each is rendered as release `ao` in
namespace `chat`, some with extra API versions known to Helm (as a cluster with those CRDs
would report them through `.Capabilities.APIVersions`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_python import Chart, _native

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "agent-orchestrator"
VALUES_DIR = Path(__file__).parent / "values"
SHARED_CRDS = ROOT.parent / "shared" / "crds"
RELEASE = "ao"
NAMESPACE = "chat"

PROMETHEUS_OPERATOR_APIS = (
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)
KEDA_APIS = ("keda.sh/v1alpha1", "keda.sh/v1alpha1/ScaledObject")

# name -> (values file or None for the chart defaults, API versions known to Helm)
VALUE_SETS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "default": (None, ()),
    "minimal": ("minimal.yaml", ()),
    "production": ("production.yaml", PROMETHEUS_OPERATOR_APIS + KEDA_APIS),
    "everything": ("everything.yaml", ()),
    "sentinel-rs256": ("sentinel-rs256.yaml", ()),
}


@dataclass
class Rendered:
    """One rendered release: its objects (NOTES.txt aside) and the NOTES text."""

    name: str
    values: dict[str, Any]
    manifests: dict[str, str]
    objects: list[dict[str, Any]] = field(default_factory=list)
    notes: str = ""

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        matches = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert matches, f"no {kind} {name} in {self.name}"
        return matches[0]

    def workloads(self) -> list[dict[str, Any]]:
        """Deployments, StatefulSets and Jobs (hooks included)."""
        return [o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]

    def pod_templates(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(object, pod template) of every workload, CronJobs (their Jobs' template) included."""
        for obj in self.objects:
            if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
                yield obj, obj["spec"]["template"]
            elif obj["kind"] == "CronJob":
                yield obj, obj["spec"]["jobTemplate"]["spec"]["template"]

    def pod_specs(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(object, pod spec) of every workload, CronJob and bare Pod."""
        for obj, template in self.pod_templates():
            yield obj, template["spec"]
        for obj in self.of_kind("Pod"):
            yield obj, obj["spec"]


def load_values(filename: str | None) -> dict[str, Any]:
    if filename is None:
        return {}
    loaded: dict[str, Any] = yaml.safe_load((VALUES_DIR / filename).read_text()) or {}
    return loaded


def render(
    values: dict[str, Any] | None = None,
    api_versions: Sequence[str] = (),
    chart_dir: Path = CHART_DIR,
    *,
    release: str = RELEASE,
    upgrade: bool = False,
) -> dict[str, str]:
    """Render like `helm template ao CHART -n chat --api-versions ...` (`--is-upgrade`).

    `Chart.render` has no API-versions argument; the native call it wraps takes the same options
    JSON with `api_versions` (Helm's `--api-versions`), which is how a CRD's presence is shown.
    """
    chart = Chart.load(chart_dir)
    try:
        options: dict[str, Any] = {
            "name": release,
            "namespace": NAMESPACE,
            "api_versions": list(api_versions),
        }
        if upgrade:
            options.update(is_upgrade=True, is_install=False)
        text = _native.call_string(
            "helm_render", chart._raw(), json.dumps(values or {}), json.dumps(options)
        )
        manifests: dict[str, str] = json.loads(text)
        return manifests
    finally:
        chart.close()


def parse(name: str, values: dict[str, Any], manifests: dict[str, str]) -> Rendered:
    rendered = Rendered(name=name, values=values, manifests=manifests)
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            rendered.notes = text
            continue
        for document in yaml.safe_load_all(text):
            if document:
                document.setdefault("metadata", {}).setdefault("annotations", {})
                document["metadata"]["annotations"] = document["metadata"]["annotations"] or {}
                document["__template__"] = path
                rendered.objects.append(document)
    return rendered


def clean(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as sent to the API server (without the test's bookkeeping key)."""
    return {key: value for key, value in obj.items() if key != "__template__"}


@pytest.fixture(scope="session")
def all_rendered() -> dict[str, Rendered]:
    result = {}
    for name, (filename, api_versions) in VALUE_SETS.items():
        values = load_values(filename)
        result[name] = parse(name, values, render(values, api_versions))
    return result


@pytest.fixture(params=list(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, all_rendered: dict[str, Rendered]) -> Rendered:
    return all_rendered[request.param]


@pytest.fixture(scope="session")
def chart_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    return loaded


@pytest.fixture(scope="session")
def chart_schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART_DIR / "values.schema.json").read_text())
    return loaded

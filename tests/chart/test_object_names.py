"""Release names, fullnameOverride and label values that Helm and the values schema accept give
objects the API server (or its StatefulSet controller) accepts.

apimachinery's validation: Service names are DNS-1035 labels; label values are at most 63
characters of [A-Za-z0-9._-], alphanumeric at both ends. The StatefulSet controller labels
every pod controller-revision-hash=<StatefulSet name>-<hash>, the hash being the FNV-32 of the
template safe-encoded in up to 10 characters (kubernetes/kubernetes#64023).
"""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import urlsplit

import helm_python
import pytest
from helm_python import Chart, HelmError

from tests.chart.conftest import CHART_DIR, Rendered, parse, render

DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
REVISION_HASH_CHARS = 10
# Both in-chart datastores on, so that their StatefulSets, Services and Secrets are rendered.
STORES = {"redis": {"enabled": True}, "postgresql": {"enabled": True}}


def _render(values: dict[str, Any], release: str = "ao") -> Rendered:
    helm_python.validate_release_name(release)  # Helm accepts it
    return parse(release, values, render(values, release=release))


def _bad_service_names(rendered: Rendered) -> list[str]:
    return [
        o["metadata"]["name"]
        for o in rendered.of_kind("Service")
        if not (len(o["metadata"]["name"]) <= 63 and DNS_1035.fullmatch(o["metadata"]["name"]))
    ]


@pytest.mark.parametrize(
    ("release", "api"),
    [
        ("chat.eu", "chat-eu-agent-orchestrator-api"),
        ("1chat", "ao-1chat-agent-orchestrator-api"),
        ("agent-orchestrator.eu", "agent-orchestrator-eu-api"),
    ],
)
def test_a_release_name_helm_accepts_gives_valid_service_names(release: str, api: str) -> None:
    """Helm accepts dotted release names and a leading digit (`helm install chat.eu ...`); the
    release name is the prefix of every Service name."""
    rendered = _render(STORES, release)
    assert not _bad_service_names(rendered)
    assert rendered.get("Service", api)


def test_a_dotted_fullname_override_passes_helm_lint() -> None:
    """fullnameOverride goes through the same rule as a release name (dots become dashes)."""
    values = {"fullnameOverride": "chat.eu"}
    report = helm_python.lint(
        CHART_DIR, values, strict=True, namespace="chat", kube_version="v1.31.0"
    )
    assert not report["errors"], report["errors"][:2]
    assert not _bad_service_names(_render(values))


@pytest.mark.parametrize(
    "release", ["customer-support-staging", "a" * 30 + "-b" * 11, "agent-orchestrator-x" * 2]
)
def test_statefulset_pods_get_valid_revision_labels(release: str) -> None:
    """`helm install customer-support-staging ...` (24 characters, far below Helm's 53) named the
    PostgreSQL StatefulSet with 54 characters: its pods' controller-revision-hash label had 65,
    the pod was refused and every api/worker/migration waited for a database."""
    rendered = _render(STORES, release)
    statefulsets = rendered.of_kind("StatefulSet")
    assert len(statefulsets) == 2
    for sts in statefulsets:
        name = sts["metadata"]["name"]
        assert len(f"{name}-{'9' * REVISION_HASH_CHARS}") <= 63, name


def test_datastore_names_stay_consistent_when_cut() -> None:
    """A cut StatefulSet name is also the name of its Service (serviceName, the host of the
    URLs, KEDA's address, the migration Job's wait) and of its Secret (every secretKeyRef)."""
    values = {**STORES, "autoscaling": {"mode": "keda"}}
    rendered = _render(values, "customer-support-staging")
    kinds_names = {(o["kind"], o["metadata"]["name"]) for o in rendered.objects}
    text = "\n".join(rendered.manifests.values())
    for sts in rendered.of_kind("StatefulSet"):
        name = sts["metadata"]["name"]
        component = name.rsplit("-", 1)[1]
        assert component in ("redis", "postgresql"), name
        assert sts["spec"]["serviceName"] == name
        assert {("Service", name), ("Secret", name)} <= kinds_names
        secret = rendered.get("Secret", name)["data"]
        url = base64.b64decode(secret["redis-url" if component == "redis" else "database-url"])
        assert urlsplit(url.decode()).hostname == name
        wait = f"{name}.chat.svc:6379" if component == "redis" else f'"{name}", 5432'
        assert wait in text, f"KEDA / the migration Job do not address {name}"
    refs = {
        env["valueFrom"]["secretKeyRef"]["name"]
        for _, spec in rendered.pod_specs()
        for container in spec.get("initContainers", []) + spec["containers"]
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    assert refs
    assert refs <= {name for kind, name in kinds_names if kind == "Secret"}


@pytest.mark.parametrize(
    "values",
    [
        {"commonLabels": {"team": "Chat Platform"}},
        {"commonLabels": {"team": "x" * 64}},
        {"commonLabels": {"team": "-chat"}},
        {"commonLabels": {"bad key": "chat"}},
        {"commonLabels": {"Example.com/team": "chat"}},
        {"api": {"podLabels": {"team": "Chat Platform"}}},
        {"worker": {"podLabels": {"team": "chat/eu"}}},
        {"executor": {"podLabels": {"team": "chat eu"}}},
        {"operator": {"podLabels": {"team": "chat eu"}}},
        {"monitoring": {"serviceMonitor": {"labels": {"release": "kube prometheus"}}}},
        {"monitoring": {"prometheusRule": {"labels": {"release": "kube prometheus"}}}},
    ],
)
def test_the_schema_refuses_labels_kubernetes_refuses(values: dict[str, Any]) -> None:
    """Label maps were `type: string`: `team: "Chat Platform"` passed and was put on every
    object, each of which the API server then refused."""
    chart = Chart.load(CHART_DIR)
    try:
        with pytest.raises(HelmError):
            chart.validate_schema(values)
    finally:
        chart.close()


def test_the_schema_accepts_labels_kubernetes_accepts() -> None:
    labels = {"team": "chat", "example.com/tier": "a.b_c-1", "x": "", "k" * 63: "v" * 63}
    pod_labels = {f"pod-{key}"[:63]: value for key, value in labels.items()}
    values = {"commonLabels": labels, "api": {"podLabels": pod_labels}}
    rendered = _render(values)
    for obj in rendered.objects:
        for value in (obj["metadata"].get("labels") or {}).values():
            assert len(value) <= 63, (obj["kind"], value)
            assert LABEL_VALUE.fullmatch(value), (obj["kind"], value)

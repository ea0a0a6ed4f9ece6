"""The manifests of k8s/ that sit next to the chart: valid, and naming what the code names."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.api.metrics import WEBSOCKET_CONNECTIONS_METRIC
from services.core import keys
from tests.chart.conftest import ROOT
from tests.chart.test_render import CRD_FILES, _crd_validator

K8S = ROOT / "k8s"


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_adapter_exposes_the_hpa_metric_per_pod() -> None:
    (values,) = _documents("prometheus-adapter.yaml")
    rules = values["rules"]
    assert rules["default"] is False
    (pods_rule,) = [r for r in rules["custom"] if r["name"]["as"] == WEBSOCKET_CONNECTIONS_METRIC]
    assert pods_rule["seriesQuery"] == f'{WEBSOCKET_CONNECTIONS_METRIC}{{namespace!="",pod!=""}}'
    assert pods_rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert pods_rule["metricsQuery"] == "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"
    (external,) = rules["external"]
    assert external["name"]["as"] == "orchestrator_stream_lag"


def test_adapter_external_metric_is_the_one_the_worker_hpa_reads(
    chart_values: dict[str, Any],
) -> None:
    (values,) = _documents("prometheus-adapter.yaml")
    (external,) = values["rules"]["external"]
    assert external["name"]["as"] == chart_values["worker"]["autoscaling"]["externalMetricName"]


def test_keda_example_matches_the_upstream_crd() -> None:
    documents = _documents("keda-scaledobjects.yaml")
    validator = _crd_validator(CRD_FILES[("keda.sh", "ScaledObject")], "v1alpha1")
    for document in documents:
        errors = [e.message for e in validator.iter_errors(document)]
        assert not errors, errors
    worker = next(d for d in documents if d["metadata"]["name"].endswith("-worker"))
    for index, trigger in enumerate(worker["spec"]["triggers"]):
        assert trigger["metadata"]["stream"] == keys.callback_stream(index)
        assert trigger["metadata"]["consumerGroup"] == keys.WORKER_GROUP


@pytest.mark.parametrize("version", ["1.30.0", "1.33.0"])
def test_otel_collector_objects_are_valid(version: str) -> None:
    for document in _documents("otel-collector.yaml"):
        kubernetes_validate.validate(document, version, strict=True)


def test_otel_collector_pipeline_uses_defined_components() -> None:
    config_map = _documents("otel-collector.yaml")[0]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    pipeline = config["service"]["pipelines"]["traces"]
    assert set(pipeline["receivers"]) <= set(config["receivers"])
    assert set(pipeline["processors"]) <= set(config["processors"])
    assert set(pipeline["exporters"]) <= set(config["exporters"])
    assert {"grpc", "http"} == set(config["receivers"]["otlp"]["protocols"])


def test_kind_cluster_is_the_context_of_the_dev_profile() -> None:
    (cluster,) = _documents("kind-cluster.yaml")
    assert cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    skaffold = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    (dev,) = [p for p in skaffold["profiles"] if p["name"] == "dev"]
    assert dev["activation"] == [{"kubeContext": f"kind-{cluster['name']}"}]
    ports = {m["hostPort"] for m in cluster["nodes"][0]["extraPortMappings"]}
    assert ports == {80, 443}

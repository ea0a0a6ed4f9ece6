"""The chart renders, lints clean and every object is valid for the API that will receive it.

Built-in kinds are checked with `kubernetes-validate` (strict: unknown fields are errors)
against two Kubernetes minors; custom resources against the upstream CRDs in ../shared/crds,
or against the chart's own crds/ for the kinds it ships (kopf's peering objects).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.chart.conftest import CHART_DIR, SHARED_CRDS, VALUE_SETS, Rendered, clean, load_values

KUBERNETES_MINORS = ("1.30.0", "1.33.0")
CRD_FILES = {
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("keda.sh", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    (
        "gateway.networking.k8s.io",
        "HTTPRoute",
    ): "gateway.networking.k8s.io_httproutes.experimental.yaml",
    # The chart's own CRDs (absolute paths: not in ../shared/crds).
    ("kopf.dev", "KopfPeering"): str(CHART_DIR / "crds" / "kopf-peering.yaml"),
    ("kopf.dev", "ClusterKopfPeering"): str(CHART_DIR / "crds" / "kopf-peering.yaml"),
}


def test_every_value_set_renders_objects(rendered: Rendered) -> None:
    kinds = {obj["kind"] for obj in rendered.objects}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    assert rendered.notes.strip(), "NOTES.txt rendered nothing"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint_strict_is_clean(name: str) -> None:
    report = helm_python.lint(
        CHART_DIR,
        load_values(VALUE_SETS[name][0]),
        strict=True,
        namespace="chat",
        kube_version="v1.31.0",
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"], report["errors"]
    assert not problems, problems


@pytest.fixture(scope="module", autouse=True)
def _cached_kubernetes_schemas() -> Iterator[None]:
    """kubernetes-validate reads its JSON schema files again for every object: read each once."""
    original = kubernetes_validate.utils.schema_contents
    kubernetes_validate.utils.schema_contents = cache(original)
    yield
    kubernetes_validate.utils.schema_contents = original


def _k8s_error(obj: dict[str, Any], version: str) -> str | None:
    try:
        kubernetes_validate.validate(clean(obj), version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return f"{obj['apiVersion']} {obj['kind']}: no Kubernetes schema and no upstream CRD"
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"{obj['kind']} {obj['metadata']['name']} at {where or '.'}: {exc.message}"
    return None


@pytest.mark.parametrize("version", KUBERNETES_MINORS)
def test_builtin_objects_are_valid_kubernetes(rendered: Rendered, version: str) -> None:
    """Every kind without an upstream CRD must be a built-in one (else it is an error here)."""
    builtin = [o for o in rendered.objects if _crd_for(o) is None]
    assert builtin
    errors = [e for e in (_k8s_error(o, version) for o in builtin) if e]
    assert not errors, "\n".join(errors)


def _crd_for(obj: dict[str, Any]) -> str | None:
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    return CRD_FILES.get((group, obj["kind"]))


def _structural(schema: Any) -> Any:
    """The CRD schema as the API server applies it: unknown fields are pruned there, so a typo
    would be silently dropped; here they are errors (additionalProperties false on every object
    schema that lists properties and does not preserve unknown fields). `nullable` is honoured."""
    if isinstance(schema, list):
        return [_structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _structural(value) for key, value in schema.items()}
    if (
        result.get("type") == "object"
        and "properties" in result
        and "additionalProperties" not in result
        and not result.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    if result.get("nullable") and isinstance(result.get("type"), str):
        result["type"] = [result["type"], "null"]
    if result.get("x-kubernetes-int-or-string"):
        result.pop("type", None)
        result["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return result


@cache
def _crd_validator(
    filename: str, version: str, kind: str | None = None
) -> jsonschema.Draft7Validator:
    """The schema of `kind` (the only CRD of the file when None) as the API server applies it."""
    crds = [d for d in yaml.safe_load_all((SHARED_CRDS / filename).read_text()) if d]
    (crd,) = [c for c in crds if kind is None or c["spec"]["names"]["kind"] == kind]
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{filename} does not serve {version}"
    schema = copy.deepcopy(served[version]["schema"]["openAPIV3Schema"])
    schema = _structural(schema)
    # metadata is validated by the API server's ObjectMeta, not by the CRD; apiVersion and kind
    # are implied for every object, whether or not the CRD lists them.
    schema["properties"]["metadata"] = {"type": "object"}
    schema["properties"].setdefault("apiVersion", {"type": "string"})
    schema["properties"].setdefault("kind", {"type": "string"})
    return jsonschema.Draft7Validator(schema)


def test_upstream_crds_are_present() -> None:
    missing = [f for f in CRD_FILES.values() if not (SHARED_CRDS / f).is_file()]
    assert not missing, f"missing from {SHARED_CRDS}: {missing}"


def test_custom_resources_match_upstream_crds(rendered: Rendered) -> None:
    errors = []
    for obj in rendered.objects:
        filename = _crd_for(obj)
        if filename is None:
            continue
        validator = _crd_validator(filename, obj["apiVersion"].split("/")[1], obj["kind"])
        for error in validator.iter_errors(clean(obj)):
            where = "/".join(str(p) for p in error.absolute_path)
            errors.append(f"{obj['kind']} {obj['metadata']['name']} at {where}: {error.message}")
    assert not errors, "\n".join(errors)


def test_custom_resources_are_rendered_by_some_value_set(
    all_rendered: dict[str, Rendered],
) -> None:
    kinds = {obj["kind"] for r in all_rendered.values() for obj in r.objects}
    assert {"ServiceMonitor", "PrometheusRule", "ScaledObject", "HTTPRoute"} <= kinds
    assert {"KopfPeering", "ClusterKopfPeering"} <= kinds


def test_crd_check_rejects_a_typo() -> None:
    """The CRD validation is not vacuous: a misspelt field of a ScaledObject is an error."""
    validator = _crd_validator(CRD_FILES[("keda.sh", "ScaledObject")], "v1alpha1")
    bad = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [], "maxReplicas": 3},
    }
    messages = [e.message for e in validator.iter_errors(bad)]
    assert any("maxReplicas" in m for m in messages)
    assert any("[] should be non-empty" in m or "is too short" in m for m in messages)


def test_chart_files_are_in_the_chart() -> None:
    for path in ("files/alerts.yaml", "files/helm-test.py", "dashboards/agent-orchestrator.json"):
        assert (CHART_DIR / path).is_file(), path
    assert not (CHART_DIR / "charts").exists(), "the chart has no subcharts"
    assert Path(CHART_DIR / ".helmignore").is_file()

"""docs/kubernetes.md's values blocks (```yaml: the Traefik, HAProxy and "client API only"
presets, the database CA volume), each as a platform team pastes it: it must pass the schema,
render, lint clean (`helm lint --strict`), give objects Kubernetes accepts, and do what the text
around it says.
"""

from __future__ import annotations

import re
from typing import Any

import helm_python
import pytest
import yaml
from helm_python import Chart

from tests.chart.conftest import CHART_DIR, ROOT, parse, render
from tests.chart.test_render import _crd_for, _k8s_error

DOC = ROOT / "docs" / "kubernetes.md"
JWT = {"auth": {"secret": "s" * 64}}


def _blocks() -> dict[str, dict[str, Any]]:
    """Each ```yaml block of the doc, named by the bold title or sentence before it."""
    text = DOC.read_text()
    blocks = {}
    for match in re.finditer(r"```yaml\n(.*?)```", text, re.S):
        before = text[: match.start()].rstrip().splitlines()[-1]
        blocks[before.strip("*: ")[:60]] = yaml.safe_load(match.group(1))
    return blocks


BLOCKS = _blocks()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def test_the_doc_has_its_values_blocks() -> None:
    assert len(BLOCKS) >= 4, list(BLOCKS)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_doc_values_block_passes_schema_renders_lints_and_validates(name: str) -> None:
    values = _merge(JWT, BLOCKS[name])
    chart = Chart.load(CHART_DIR)
    try:
        chart.validate_schema(values)
    finally:
        chart.close()
    rendered = parse(name, values, render(values))
    errors = [_k8s_error(o, "1.30.0") for o in rendered.objects if _crd_for(o) is None]
    assert not [e for e in errors if e], errors
    report = helm_python.lint(
        CHART_DIR, values, strict=True, namespace="chat", kube_version="v1.31.0"
    )
    assert not report["errors"], report["errors"]
    assert not [m for m in report["messages"] if m["severity"] >= 2]
    if "extraVolumes" in BLOCKS[name]:
        (volume,) = BLOCKS[name]["extraVolumes"]
        (mount,) = BLOCKS[name]["extraVolumeMounts"]
        api = rendered.get("Deployment", "ao-agent-orchestrator-api")["spec"]["template"]
        assert volume in api["spec"]["volumes"]
        assert mount in api["spec"]["containers"][0]["volumeMounts"]
        return
    (ingress,) = rendered.of_kind("Ingress")
    annotations = ingress["metadata"]["annotations"] or {}
    if "Traefik" in name or "HAProxy" in name:
        # "the nginx.ingress.kubernetes.io/* defaults are rendered only with className: nginx"
        assert not [k for k in annotations if k.startswith("nginx.ingress.kubernetes.io/")]
        assert (
            ingress["spec"]["ingressClassName"] == BLOCKS[name]["exposure"]["ingress"]["className"]
        )
    if "HAProxy" in name:
        assert annotations == BLOCKS[name]["exposure"]["ingress"]["annotations"]
    if "Traefik" in name:
        service = rendered.get("Service", "ao-agent-orchestrator-api")
        assert service["metadata"]["annotations"] == BLOCKS[name]["api"]["service"]["annotations"]
    if "hosts" in BLOCKS[name]["exposure"]["ingress"]:  # "To publish the client API only"
        (rule,) = ingress["spec"]["rules"]
        assert [p["path"] for p in rule["http"]["paths"]] == ["/api", "/ws"]

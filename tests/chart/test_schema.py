"""values.schema.json covers every value and refuses nonsense before anything renders."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from helm_python import Chart, HelmError, HelmRenderError, HelmValuesError

from tests.chart.conftest import CHART_DIR, VALUE_SETS, load_values, render


@pytest.fixture(scope="module")
def chart() -> Any:
    loaded = Chart.load(CHART_DIR)
    yield loaded
    loaded.close()


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_value_sets_are_valid(chart: Any, name: str) -> None:
    chart.validate_schema(load_values(VALUE_SETS[name][0]))


def _leaves(values: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(values, dict) and values:
        return [leaf for key, value in values.items() for leaf in _leaves(value, (*path, key))]
    return [path]


def _schema_at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: dict[str, Any] | None = schema
    for key in path:
        if node is None:
            return None
        properties = node.get("properties", {})
        if key in properties:
            node = properties[key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif node.get("type") == "object" and "additionalProperties" not in node:
            return node  # a free-form object (e.g. securityContext): everything below is allowed
        else:
            return None
    return node


def test_schema_declares_every_value(
    chart_values: dict[str, Any], chart_schema: dict[str, Any]
) -> None:
    missing = [".".join(p) for p in _leaves(chart_values) if _schema_at(chart_schema, p) is None]
    assert not missing, f"values without a schema entry: {missing}"


def test_schema_entries_have_a_type(chart_schema: dict[str, Any]) -> None:
    untyped = []

    def walk(node: dict[str, Any], path: str) -> None:
        if not any(k in node for k in ("type", "oneOf", "anyOf", "enum")):
            untyped.append(path)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(chart_schema, "")
    assert not untyped


def test_top_level_and_component_objects_refuse_unknown_keys(
    chart_schema: dict[str, Any],
) -> None:
    assert chart_schema["additionalProperties"] is False
    for key in ("config", "api", "worker", "executor", "operator", "exposure", "autoscaling"):
        assert chart_schema["properties"][key]["additionalProperties"] is False, key


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"bogus": True}, "bogus"),
        ({"api": {"replicaCount": 0}}, "replicaCount"),
        ({"worker": {"replicaCount": -1}}, "replicaCount"),
        ({"api": {"replicaCount": "2"}}, "replicaCount"),
        ({"api": {"image": {"repository": ""}}}, "repository"),
        ({"worker": {"image": {"repository": ""}}}, "repository"),
        ({"api": {"image": {"digest": "latest"}}}, "digest"),
        ({"api": {"autoscaling": {"minReplicas": 0}}}, "minReplicas"),
        ({"api": {"bogus": 1}}, "bogus"),
        ({"config": {"maxWebsocketConnections": "many"}}, "maxWebsocketConnections"),
        ({"config": {"logLevel": "LOUD"}}, "logLevel"),
        ({"config": {"allowedOrigins": "https://a.example"}}, "allowedOrigins"),
        ({"autoscaling": {"mode": "both"}}, "mode"),
        ({"exposure": {"mode": "loadbalancer"}}, "mode"),
        ({"externalRedis": {"mode": "ring"}}, "mode"),
        ({"externalRedis": {"url": "http://redis:6379"}}, "url"),
        ({"tiers": {"free": {"maxConnections": 0}}}, "maxConnections"),
        ({"tiers": {"free": {"priority": "urgent"}}}, "priority"),
        ({"tiers": {"free": {"tokensPerDay": 0}}}, "tokensPerDay"),
        ({"tiers": {"free": {"typo": 1}}}, "typo"),
        ({"api": {"drain": {"seconds": -1}}}, "seconds"),
        ({"auth": {"algorithm": "none"}}, "algorithm"),
        ({"networkPolicy": {"enabled": "yes"}}, "enabled"),
        ({"monitoring": {"prometheusRule": {"errorRatio": 2}}}, "errorRatio"),
        ({"operator": {"watchNamespaces": ["Not_A_Namespace"]}}, "watchNamespaces"),
        ({"operator": {"peering": {"name": "Not_A_Name"}}}, "name"),
        ({"operator": {"livenessPort": 0}}, "livenessPort"),
        ({"operator": {"refreshSeconds": 0.5}}, "refreshSeconds"),
        ({"operator": {"healthPort": 8080}}, "healthPort"),
    ],
)
def test_schema_refuses_nonsense(chart: Any, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HelmValuesError, match=complaint):
        chart.validate_schema(values)


def test_schema_takes_every_origin_form_the_api_takes(chart: Any) -> None:
    """README: `*` admits every origin, and a `*` inside an entry any text there."""
    chart.validate_schema({"config": {"allowedOrigins": ["*"]}})
    chart.validate_schema({"config": {"allowedOrigins": ["https://*.example.com"]}})
    with pytest.raises(HelmValuesError, match="allowedOrigins"):
        chart.validate_schema({"config": {"allowedOrigins": ["example.com"]}})
    with pytest.raises(HelmValuesError, match="allowedOrigins"):  # the api refuses a path
        chart.validate_schema({"config": {"allowedOrigins": ["https://app.example/"]}})


@pytest.mark.parametrize(("algorithm", "length"), [("HS256", 31), ("HS384", 47), ("HS512", 63)])
def test_render_refuses_an_hs_secret_the_api_would_refuse(algorithm: str, length: int) -> None:
    """Every new pod exited 2 on it and the rollout stalled (maxUnavailable 0): refused before
    any pod rolls. The same check covers a secret the chart generated and keeps (48 characters
    before it made 64: short for HS512), which `lookup` cannot show offline."""
    with pytest.raises(HelmRenderError, match=f"{algorithm} needs at least"):
        render({"auth": {"algorithm": algorithm, "secret": "s" * length}})
    render({"auth": {"algorithm": algorithm, "secret": "s" * (length + 1)}})


def test_render_refuses_what_the_schema_refuses() -> None:
    with pytest.raises(HelmValuesError, match="replicaCount"):
        render({"api": {"replicaCount": 0}})


@pytest.fixture(scope="module")
def chart_without_schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart minus its schema: what `helm install --skip-schema-validation` renders."""
    target = tmp_path_factory.mktemp("chart") / "agent-orchestrator"
    shutil.copytree(CHART_DIR, target)
    (target / "values.schema.json").unlink()
    return target


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"autoscaling": {"mode": "hpa+keda"}}, "mutually exclusive"),
        ({"exposure": {"mode": "both"}}, "exposure.mode"),
        ({"redis": {"enabled": True}, "externalRedis": {"url": "redis://r:6379"}}, "exclusive"),
        ({"redis": {"enabled": False}}, "Redis is required"),
        (
            {"postgresql": {"enabled": True}, "externalDatabase": {"existingSecret": "db"}},
            "exclusive",
        ),
        ({"auth": {"algorithm": "RS256"}}, "publicKey"),
        ({"config": {"defaultTier": "gold"}}, "defaultTier"),
        ({"api": {"autoscaling": {"targetConnectionsPerPod": 1000}}}, "targetConnectionsPerPod"),
        ({"api": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas"),
        (
            {
                "autoscaling": {"mode": "keda"},
                "redis": {"enabled": False},
                "externalRedis": {"url": "redis://r:6379"},
            },
            "redisAddress",
        ),
        ({"config": {"extraEnv": {"ORCHESTRATOR_LOG_LEVEL": "DEBUG"}}}, "already set"),
        ({"config": {"extraEnv": {"ORCHESTRATOR_REDIS_URL": "redis://x"}}}, "already set"),
        (
            {"operator": {"enabled": True, "clusterWide": True, "watchNamespaces": ["a"]}},
            "leave operator.watchNamespaces empty",
        ),
    ],
)
def test_template_guards_fail_with_a_clear_line(
    chart_without_schema: Path, values: dict[str, Any], message: str
) -> None:
    """Guards that hold even when schema validation is skipped, or that span several keys."""
    with pytest.raises(HelmError, match=message):
        render(values, chart_dir=chart_without_schema)

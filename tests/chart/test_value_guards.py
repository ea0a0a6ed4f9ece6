"""Values the schema accepts that would give objects the API server refuses, or pods that never
start, are refused by the schema or at render time (ao.validate) with a message naming them;
empty peer lists mean what values.yaml says (no peer), not Kubernetes' "every source".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helm_python import Chart, HelmError

from services.core.settings import ConfigError
from services.core.tiers import DEFAULT_TIERS, LIMIT_KEYS, TIERS_FILE_VARIABLE, parse_tiers_config
from tests.chart.conftest import CHART_DIR, Rendered, clean, parse, render

FIXED = {  # the generated secrets would otherwise differ from one render to the next
    "auth": {"secret": "s" * 64},
    "redis": {"password": "r" * 32},
    "postgresql": {"password": "p" * 32},
}
# A complete new tier: every limit a tier without a built-in base needs.
GOLD = {
    "requestsPerMinutePerTenant": 100,
    "maxConnections": 50,
    "tokensPerDay": "unlimited",
    "maxMessageChars": 4000,
    "streaming": True,
    "priority": "high",
    "taskTimeoutSeconds": 90,
}


def _render(values: dict[str, Any], upgrade: bool = False) -> Rendered:
    return parse("guards", values, render(values, upgrade=upgrade))


def _refused(values: dict[str, Any]) -> str:
    """The render's error message (the test fails if the values render)."""
    with pytest.raises(HelmError) as info:
        render(values)
    return str(info.value)


def _schema_refuses(values: dict[str, Any]) -> None:
    chart = Chart.load(CHART_DIR)
    try:
        with pytest.raises(HelmError):
            chart.validate_schema(values)
    finally:
        chart.close()


def test_service_port_equal_to_the_metrics_port_is_refused() -> None:
    """The api Service exposes api.service.port and config.metricsPort: equal, they are a
    duplicate Service port, which the API server refuses."""
    message = _refused({"api": {"service": {"port": 9090}}})
    assert "api.service.port and config.metricsPort must differ (both 9090)" in message


def test_metrics_port_equal_to_the_api_port_is_refused() -> None:
    """The api pod's HTTP server (api.port) and its metrics server (config.metricsPort) are two
    servers: on one port the second fails with "address already in use" and the pod never
    becomes ready."""
    message = _refused({"api": {"port": 8000}, "config": {"metricsPort": 8000}})
    assert "api.port and config.metricsPort must differ (both 8000)" in message


@pytest.mark.parametrize("missing", sorted(GOLD))
def test_a_new_tier_missing_a_limit_is_refused_naming_it(missing: str) -> None:
    """A partial new tier passed the schema and the render, then every api/worker pod exited at
    start on the tiers file ("missing required field")."""
    gold = {key: value for key, value in GOLD.items() if key != missing}
    message = _refused({"tiers": {"gold": gold}})
    assert f"tiers.gold is a new tier: it must set every limit (missing: {missing})" in message


def test_a_partial_new_tier_names_every_missing_limit() -> None:
    message = _refused({"tiers": {"gold": {"maxConnections": 50, "priority": "high"}}})
    assert "(missing: requestsPerMinutePerTenant, tokensPerDay, maxMessageChars, streaming, " in (
        message
    )


def test_the_limits_a_new_tier_needs_are_those_the_server_needs(tmp_path: Path) -> None:
    """GOLD (what ao.validate requires) loads in the server's tiers parser, and no smaller set
    does: the chart's list and services/core/tiers.py agree."""
    assert set(GOLD) | {"requestsPerMinutePerSession"} == set(LIMIT_KEYS)
    rendered = _render({"tiers": {"gold": GOLD, "free": {"maxConnections": 7}}})
    text = rendered.get("ConfigMap", "ao-agent-orchestrator-tiers")["data"]["tiers.json"]
    new_tier_defaults = {"requestsPerMinutePerSession": 100}
    tiers = parse_tiers_config(
        text, DEFAULT_TIERS, variable=TIERS_FILE_VARIABLE, new_tier_defaults=new_tier_defaults
    )
    assert tiers["gold"].max_connections == 50
    assert tiers["free"].max_connections == 7
    document = json.loads(text)
    for key in GOLD:
        partial = {name: value for name, value in document["gold"].items() if name != key}
        with pytest.raises(ConfigError, match=key):
            parse_tiers_config(
                json.dumps({"gold": partial}),
                DEFAULT_TIERS,
                variable=TIERS_FILE_VARIABLE,
                new_tier_defaults=new_tier_defaults,
            )


@pytest.mark.parametrize("tier", sorted(DEFAULT_TIERS))
def test_a_built_in_tier_may_be_overridden_partially(tier: str) -> None:
    rendered = _render({"tiers": {tier: {"maxConnections": 7}}})
    assert rendered.get("ConfigMap", "ao-agent-orchestrator-tiers")


def _ingress_rules(rendered: Rendered, policy: str) -> list[dict[str, Any]]:
    return rendered.get("NetworkPolicy", policy)["spec"]["ingress"]


@pytest.mark.parametrize("component", ["api", "worker", "executor"])
def test_an_empty_metrics_from_opens_the_metrics_port_to_no_source(component: str) -> None:
    """A rule with `from: []` admits every source ("If this field is empty or missing, this
    rule matches all sources"): the api's metrics port also serves /drain."""
    values = {"executor": {"enabled": True}, "networkPolicy": {"metricsFrom": []}}
    rules = _ingress_rules(_render(values), f"ao-agent-orchestrator-{component}")
    assert all(rule.get("from") for rule in rules), rules
    assert not [r for r in rules if any(p["port"] == "metrics" for p in r.get("ports", []))]
    assert isinstance(rules, list)  # `ingress: []`, not null: nothing admitted
    if component == "api":
        assert [p["port"] for r in rules for p in r["ports"]] == ["http"]


def test_an_empty_keda_from_opens_redis_to_no_source() -> None:
    values = {"autoscaling": {"mode": "keda"}, "networkPolicy": {"kedaFrom": []}}
    rules = _ingress_rules(_render(values), "ao-agent-orchestrator-redis")
    assert all(rule.get("from") for rule in rules), rules
    assert len(rules) == 1, "only the release's own clients"


def test_peer_lists_still_open_their_ports() -> None:
    values = {"autoscaling": {"mode": "keda"}}
    rendered = _render(values)
    api = _ingress_rules(rendered, "ao-agent-orchestrator-api")
    assert [r["ports"][0]["port"] for r in api] == ["http", "metrics"]
    assert len(_ingress_rules(rendered, "ao-agent-orchestrator-redis")) == 2


def test_an_ingress_without_hosts_is_refused_by_the_schema() -> None:
    """`exposure.ingress.hosts: []` rendered an Ingress with neither rules nor defaultBackend,
    which the API server refuses."""
    _schema_refuses({"exposure": {"ingress": {"hosts": []}}})


# apps/v1 ValidateStatefulSetUpdate: only these spec fields may change on an existing object.
STATEFULSET_MUTABLE = {
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
}


@pytest.mark.parametrize("store", ["postgresql", "redis"])
def test_turning_on_persistence_changes_only_what_the_upgrade_docs_cover(store: str) -> None:
    """`--set <store>.persistence.enabled=true` on an existing release adds volumeClaimTemplates,
    which the API server refuses to change: docs/kubernetes.md has the upgrade delete the
    StatefulSet with --cascade=orphan first. That procedure covers only this StatefulSet: no
    other object, and no other immutable field (selector, serviceName), may change."""
    before = _render(FIXED)
    persistent = {**FIXED, store: {**FIXED[store], "persistence": {"enabled": True}}}
    after = _render(persistent, upgrade=True)
    name = f"ao-agent-orchestrator-{store}"

    def others(rendered: Rendered) -> list[dict[str, Any]]:
        return [
            clean(o)
            for o in rendered.objects
            if (o["kind"], o["metadata"]["name"]) != ("StatefulSet", name)
        ]

    assert others(before) == others(after)
    old = before.get("StatefulSet", name)["spec"]
    new = after.get("StatefulSet", name)["spec"]
    changed = {key for key in set(old) | set(new) if old.get(key) != new.get(key)}
    assert changed - STATEFULSET_MUTABLE == {"volumeClaimTemplates"}


def test_an_ingress_body_limit_below_the_apis_is_refused() -> None:
    """tests/ingress: behind the chart's nginx ingress a message the api accepts (its
    MAX_BODY_BYTES, raised with MAX_MESSAGE_CHARS through config.extraEnv) got the ingress's
    own HTML 413 at the fixed 1m, which no client can read as the error shape."""
    big = {"ORCHESTRATOR_MAX_MESSAGE_CHARS": "100000", "ORCHESTRATOR_MAX_BODY_BYTES": "1300000"}
    message = _refused({**FIXED, "config": {"extraEnv": big}})
    assert (
        "proxy-body-size (1m = 1048576 bytes) is below ORCHESTRATOR_MAX_BODY_BYTES (1300000)"
        in (message)
    )
    raised = {"nginx.ingress.kubernetes.io/proxy-body-size": "2m"}
    _render(
        {**FIXED, "config": {"extraEnv": big}, "exposure": {"ingress": {"annotations": raised}}}
    )
    _render(
        {
            **FIXED,
            "exposure": {
                "ingress": {"annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "600k"}}
            },
        }
    )
    assert "600k = 614400" in _refused(
        {
            **FIXED,
            "config": {"extraEnv": {"ORCHESTRATOR_MAX_BODY_BYTES": "700000"}},
            "exposure": {
                "ingress": {"annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "600k"}}
            },
        }
    )


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (
            {"commonLabels": {"app.kubernetes.io/name": "chat"}},
            "commonLabels.app.kubernetes.io/name",
        ),
        (
            {"api": {"podLabels": {"app.kubernetes.io/component": "frontend"}}},
            "api.podLabels.app.kubernetes.io/component",
        ),
        (
            {"commonLabels": {"team": "a"}, "worker": {"podLabels": {"team": "b"}}},
            "worker.podLabels.team",
        ),
        (
            {"executor": {"enabled": True, "podAnnotations": {"checksum/config": "pinned"}}},
            "executor.podAnnotations.checksum/config",
        ),
    ],
    ids=["common-selector-label", "pod-selector-label", "pod-repeats-common", "checksum"],
)
def test_a_label_or_annotation_the_chart_writes_is_refused(
    values: dict[str, Any], named: str
) -> None:
    """Given again, the key rendered twice in one mapping: Helm kept the user's (a pod template
    that no longer matched its Deployment's selector, a checksum that never rolled the pods)
    and kustomize or Flux refused the manifest ("mapping key already defined")."""
    assert named in _refused({**FIXED, **values})


def test_labels_and_annotations_of_ones_own_are_rendered_once() -> None:
    values = {
        **FIXED,
        "commonLabels": {"team": "chat"},
        "api": {"podLabels": {"tier": "edge"}, "podAnnotations": {"example.com/owner": "chat"}},
    }
    rendered = _render(values)
    (api,) = [d for d in rendered.of_kind("Deployment") if d["metadata"]["name"].endswith("-api")]
    template = api["spec"]["template"]["metadata"]
    assert template["labels"]["team"] == "chat"
    assert template["labels"]["tier"] == "edge"
    assert template["annotations"]["example.com/owner"] == "chat"
    assert {"checksum/config", "checksum/secret"} <= set(template["annotations"])
    text = rendered.manifests["agent-orchestrator/templates/api-deployment.yaml"]
    assert text.count("tier: edge") == 1


@pytest.mark.parametrize(
    ("component", "name"),
    [
        ("api", "ORCHESTRATOR_METRICS_PORT"),
        ("api", "ORCHESTRATOR_DRAIN_SECONDS"),
        ("worker", "ORCHESTRATOR_CALLBACK_PARTITIONS"),
        ("executor", "ORCHESTRATOR_TIERS_FILE"),
        ("worker", "ORCHESTRATOR_REDIS_MODE"),
    ],
)
def test_a_component_cannot_override_a_setting_the_chart_wires_elsewhere(
    component: str, name: str
) -> None:
    """`env` wins over the settings ConfigMap: ORCHESTRATOR_METRICS_PORT in api.extraEnv moved
    /metrics and /drain off the port the preStop hook, Service and NetworkPolicy name (every
    rollout cut all sockets at once); ORCHESTRATOR_DRAIN_SECONDS outlasted the grace period."""
    values = {
        **FIXED,
        "executor": {"enabled": True},
        component: {"extraEnv": [{"name": name, "value": "1"}]},
    }
    if component == "executor":
        values["executor"]["extraEnv"] = [{"name": name, "value": "/tmp/t.json"}]  # noqa: S108
    message = _refused(values)
    assert f"{component}.extraEnv: {name} is wired by the chart" in message


def test_the_api_body_limit_set_in_api_extra_env_is_checked_against_the_ingress() -> None:
    """Only the api takes bodies, so a team raises ORCHESTRATOR_MAX_BODY_BYTES there: the
    proxy-body-size guard read config.extraEnv only, and bodies of 1 to 4 MiB got
    ingress-nginx's HTML 413 instead of reaching the api."""
    limit = [{"name": "ORCHESTRATOR_MAX_BODY_BYTES", "value": "4194304"}]
    assert "proxy-body-size" in _refused({**FIXED, "api": {"extraEnv": limit}})
    annotations = {"nginx.ingress.kubernetes.io/proxy-body-size": "4m"}
    rendered = _render(
        {**FIXED, "api": {"extraEnv": limit}, "exposure": {"ingress": {"annotations": annotations}}}
    )
    assert rendered.of_kind("Ingress")


SETTINGS_READERS = {"api", "worker", "executor", "operator", "migrations", "prune"}


def test_extra_volumes_reach_every_pod_that_reads_the_settings(
    all_rendered: dict[str, Rendered],
) -> None:
    """README: a database URL may name files (sslrootcert, sslcert, sslkey); the schema
    refused every key that could put such a file into the pods, leaving `sslmode=require`
    (encrypted, the server not verified) as the only way to a managed PostgreSQL."""
    rendered = all_rendered["everything"]
    readers = 0
    for obj, template in rendered.pod_templates():
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        if component not in SETTINGS_READERS:
            assert "db-ca" not in volumes, obj["metadata"]["name"]
            continue
        readers += 1
        assert volumes["db-ca"] == {"name": "db-ca", "secret": {"secretName": "db-ca"}}
        (container,) = template["spec"]["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["db-ca"] == {"name": "db-ca", "mountPath": "/etc/ssl/db", "readOnly": True}
        assert {"tmp", "db-ca"} <= set(mounts)
    assert readers == len(SETTINGS_READERS)


def test_a_mount_of_no_extra_volume_is_refused() -> None:
    mounts = [{"name": "db-ca", "mountPath": "/etc/ssl/db"}]
    assert "extraVolumeMounts: db-ca is not in extraVolumes" in _refused(
        {**FIXED, "extraVolumeMounts": mounts}
    )


@pytest.mark.parametrize(
    "values",
    [
        {"extraVolumes": [{"name": "tmp", "emptyDir": {}}]},
        {
            "extraVolumes": [{"name": "x", "emptyDir": {}}],
            "extraVolumeMounts": [{"name": "x", "mountPath": "/etc/agent-orchestrator"}],
        },
        {
            "extraVolumes": [{"name": "x", "emptyDir": {}}],
            "extraVolumeMounts": [{"name": "x", "mountPath": "relative"}],
        },
    ],
    ids=["the chart's volume name", "the tiers directory", "a relative path"],
)
def test_extra_volumes_cannot_shadow_the_charts_own(values: dict[str, Any]) -> None:
    _schema_refuses(values)

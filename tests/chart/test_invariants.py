"""What must hold in every rendered release, whatever the values.

Where the chart names something the code also names (the HPA metric, the settings variables,
the callback streams and their consumer group, the tier defaults), the test imports the code's
name so that the two cannot drift apart.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import pytest

from services.api.metrics import WEBSOCKET_CONNECTIONS_METRIC
from services.core import keys
from services.core.settings import ENV_PREFIX, Settings
from services.core.tiers import DEFAULT_TIERS, TIERS_FILE_VARIABLE, parse_tiers_config
from services.operator.rbac import required_rules
from services.operator.settings import OPERATOR_PREFIX, OperatorSettings
from tests.chart.conftest import (
    CHART_DIR,
    KEDA_APIS,
    NAMESPACE,
    PROMETHEUS_OPERATOR_APIS,
    Rendered,
    parse,
    render,
)

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
SELECTOR_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
}
ORCHESTRATOR_COMPONENTS = {"api", "worker", "executor", "operator"}
TMP = "/tmp"  # noqa: S108 (the pods' emptyDir mount, not a temporary file here)


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def _settings_configmap(rendered: Rendered) -> dict[str, str]:
    data: dict[str, str] = rendered.get("ConfigMap", "ao-agent-orchestrator-config")["data"]
    return data


def _component(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"]["app.kubernetes.io/component"])


def _autoscaled_targets(rendered: Rendered) -> set[str]:
    targets = {
        o["spec"]["scaleTargetRef"]["name"] for o in rendered.of_kind("HorizontalPodAutoscaler")
    }
    targets |= {o["spec"]["scaleTargetRef"]["name"] for o in rendered.of_kind("ScaledObject")}
    return targets


# ---- autoscaling ----------------------------------------------------------------------------


def test_api_hpa_scales_on_the_metric_the_api_exports(all_rendered: dict[str, Rendered]) -> None:
    hpa = all_rendered["default"].get("HorizontalPodAutoscaler", "ao-agent-orchestrator-api")
    pods_metrics = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [m["pods"]["metric"]["name"] for m in pods_metrics] == [WEBSOCKET_CONNECTIONS_METRIC]
    assert pods_metrics[0]["pods"]["target"]["type"] == "AverageValue"
    assert any(
        m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]
    ), "CPU is the second metric"


def test_keda_api_trigger_queries_the_metric_the_api_exports(
    all_rendered: dict[str, Rendered],
) -> None:
    scaled = all_rendered["production"].get("ScaledObject", "ao-agent-orchestrator-api")
    prometheus = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    assert prometheus
    assert WEBSOCKET_CONNECTIONS_METRIC + "{" in prometheus[0]["metadata"]["query"]
    assert prometheus[0]["metricType"] == "AverageValue"


def test_scale_down_is_slow_and_scale_up_fast(rendered: Rendered) -> None:
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        behavior = hpa["spec"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
        assert behavior["scaleDown"]["policies"] == [
            {"type": "Pods", "value": 1, "periodSeconds": 60}
        ]
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    for scaled in rendered.of_kind("ScaledObject"):
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_worker_keda_triggers_read_every_callback_partition(
    all_rendered: dict[str, Rendered],
) -> None:
    rendered = all_rendered["production"]
    partitions = int(_settings_configmap(rendered)["ORCHESTRATOR_CALLBACK_PARTITIONS"])
    scaled = rendered.get("ScaledObject", "ao-agent-orchestrator-worker")
    triggers = scaled["spec"]["triggers"]
    assert [t["metadata"]["stream"] for t in triggers] == [
        keys.callback_stream(n) for n in range(partitions)
    ]
    assert {t["metadata"]["consumerGroup"] for t in triggers} == {keys.WORKER_GROUP}
    assert {t["type"] for t in triggers} == {"redis-streams"}
    worker = rendered.get("Deployment", "ao-agent-orchestrator-worker")
    env = {e["name"] for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert all(t["metadata"]["passwordFromEnv"] in env for t in triggers)


def test_worker_hpa_reads_the_workers_group_lag(all_rendered: dict[str, Rendered]) -> None:
    hpa = all_rendered["default"].get("HorizontalPodAutoscaler", "ao-agent-orchestrator-worker")
    external = hpa["spec"]["metrics"][0]["external"]
    assert external["metric"]["selector"]["matchLabels"] == {"group": keys.WORKER_GROUP}


def test_autoscaling_modes_are_mutually_exclusive(rendered: Rendered) -> None:
    has_hpa = bool(rendered.of_kind("HorizontalPodAutoscaler"))
    has_keda = bool(rendered.of_kind("ScaledObject"))
    assert not (has_hpa and has_keda)


def test_no_replicas_where_an_autoscaler_owns_them(rendered: Rendered) -> None:
    """Helm 4 applies server-side: a rendered replicas field would fight the autoscaler."""
    targets = _autoscaled_targets(rendered)
    for deployment in rendered.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        if name in targets:
            assert "replicas" not in deployment["spec"], name
        else:
            assert deployment["spec"]["replicas"] >= 1, name


def test_autoscaler_targets_exist(rendered: Rendered) -> None:
    deployments = {d["metadata"]["name"] for d in rendered.of_kind("Deployment")}
    assert _autoscaled_targets(rendered) <= deployments


# ---- labels and selectors -------------------------------------------------------------------


def test_every_object_has_the_standard_labels(rendered: Rendered) -> None:
    for obj in rendered.objects:
        labels = obj["metadata"].get("labels", {})
        missing = [label for label in STANDARD_LABELS if label not in labels]
        assert not missing, f"{obj['kind']} {obj['metadata']['name']}: {missing}"
        assert labels["app.kubernetes.io/part-of"] == "agent-orchestrator"


def test_selectors_use_only_name_instance_component(rendered: Rendered) -> None:
    for obj in rendered.objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget"):
            selector = obj["spec"]["selector"]["matchLabels"]
        elif obj["kind"] == "Service":
            selector = obj["spec"]["selector"]
        else:
            continue
        assert set(selector) == SELECTOR_LABELS, f"{obj['kind']} {obj['metadata']['name']}"


def _pod_labels(rendered: Rendered) -> list[dict[str, str]]:
    return [t["metadata"]["labels"] for _, t in rendered.pod_templates()] + [
        o["metadata"]["labels"] for o in rendered.of_kind("Pod")
    ]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_workload_selectors_match_their_pod_labels(rendered: Rendered) -> None:
    for obj in rendered.of_kind("Deployment") + rendered.of_kind("StatefulSet"):
        selector = obj["spec"]["selector"]["matchLabels"]
        assert _matches(selector, obj["spec"]["template"]["metadata"]["labels"])


def test_services_pdbs_and_policies_select_rendered_pods(rendered: Rendered) -> None:
    pods = _pod_labels(rendered)
    for obj in rendered.objects:
        if obj["kind"] == "Service":
            selector = obj["spec"]["selector"]
        elif obj["kind"] == "PodDisruptionBudget":
            selector = obj["spec"]["selector"]["matchLabels"]
        elif obj["kind"] == "NetworkPolicy":
            selector = obj["spec"]["podSelector"]["matchLabels"]
        else:
            continue
        assert any(_matches(selector, labels) for labels in pods), (
            f"{obj['kind']} {obj['metadata']['name']} selects no rendered pod"
        )


def test_service_monitor_selects_the_metrics_services(rendered: Rendered) -> None:
    for monitor in rendered.of_kind("ServiceMonitor"):
        selector = monitor["spec"]["selector"]
        components = selector["matchExpressions"][0]["values"]
        selected = [
            s
            for s in rendered.of_kind("Service")
            if _matches(selector["matchLabels"], s["metadata"]["labels"])
            and _component(s) in components
        ]
        assert {_component(s) for s in selected} >= {"api", "worker"}
        for service in selected:
            assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def test_service_ports_target_named_container_ports(rendered: Rendered) -> None:
    for service in rendered.of_kind("Service"):
        pods = [
            o["spec"]["template"]["spec"]
            for o in rendered.workloads()
            if _matches(service["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"])
        ]
        named = {p["name"] for pod in pods for c in pod["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, f"{service['metadata']['name']} {port['name']}"


# ---- pods: probes, resources, security ------------------------------------------------------


def test_every_container_has_resources(rendered: Rendered) -> None:
    for obj, pod in rendered.pod_specs():
        for container in _containers(pod):
            resources = container.get("resources", {})
            where = f"{obj['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where


def test_every_container_runs_restricted(rendered: Rendered) -> None:
    for obj, pod in rendered.pod_specs():
        pod_context = pod["securityContext"]
        assert pod_context["runAsNonRoot"] is True
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod_context["runAsUser"] >= 10000
        assert pod_context["runAsGroup"] >= 10000
        for container in _containers(pod):
            context = container["securityContext"]
            where = f"{obj['metadata']['name']}/{container['name']}"
            assert context["runAsNonRoot"] is True, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "privileged" not in context, where


def test_only_tmp_and_data_paths_are_writable(rendered: Rendered) -> None:
    for obj, pod in rendered.pod_specs():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            assert TMP in mounts, f"{obj['metadata']['name']}: no /tmp emptyDir"
            assert "emptyDir" in volumes[mounts[TMP]["name"]]
            for path, mount in mounts.items():
                volume = volumes.get(mount["name"], {})
                if "configMap" in volume or "secret" in volume:
                    assert mount.get("readOnly") is True, f"{obj['metadata']['name']} {path}"


def test_long_running_containers_have_probes(rendered: Rendered) -> None:
    """Deployments and StatefulSets: liveness everywhere; readiness where something waits on
    the pod (Services, rollouts). The operator serves nothing, so it has liveness only."""
    for obj in rendered.of_kind("Deployment") + rendered.of_kind("StatefulSet"):
        for container in obj["spec"]["template"]["spec"]["containers"]:
            where = f"{obj['metadata']['name']}/{container['name']}"
            assert "livenessProbe" in container, where
            if _component(obj) != "operator":
                assert "readinessProbe" in container, where


def test_api_probes_are_drain_aware_and_process_local(all_rendered: dict[str, Rendered]) -> None:
    api = all_rendered["default"].get("Deployment", "ao-agent-orchestrator-api")
    container = api["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["lifecycle"]["preStop"]["httpGet"] == {
        "path": "/drain",
        "port": "metrics",
        "httpHeaders": [{"name": "X-Orchestrator-Drain", "value": "preStop"}],
    }
    assert container["args"] == ["orchestrator", "api", "--host", "0.0.0.0", "--port", "8000"]


def test_grace_period_exceeds_the_drain_window(rendered: Rendered) -> None:
    drain = float(_settings_configmap(rendered)["ORCHESTRATOR_DRAIN_SECONDS"])
    api = rendered.get("Deployment", "ao-agent-orchestrator-api")
    grace = api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= drain + 5, f"grace {grace}s leaves no margin after a {drain}s drain"


def test_rollouts_never_reduce_capacity(rendered: Rendered) -> None:
    for deployment in rendered.of_kind("Deployment"):
        strategy = deployment["spec"]["strategy"]
        if _component(deployment) == "operator":
            assert strategy == {"type": "Recreate"}
            assert deployment["spec"]["replicas"] == 1
        else:
            assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_pdb_for_every_component_that_can_have_several_pods(rendered: Rendered) -> None:
    budgets = {_component(p) for p in rendered.of_kind("PodDisruptionBudget")}
    targets = _autoscaled_targets(rendered)
    for deployment in rendered.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        component = _component(deployment)
        if component not in ("api", "worker"):
            continue
        several = name in targets or deployment["spec"].get("replicas", 1) > 1
        assert (component in budgets) == several, component


def test_only_the_operator_mounts_a_service_account_token(rendered: Rendered) -> None:
    for obj, pod in rendered.pod_specs():
        expected = _component(obj) == "operator"
        assert pod.get("automountServiceAccountToken") is expected, obj["metadata"]["name"]
    for account in rendered.of_kind("ServiceAccount"):
        expected = _component(account) == "operator"
        assert account.get("automountServiceAccountToken") is expected


def test_pods_roll_when_configuration_changes(rendered: Rendered) -> None:
    for deployment in rendered.of_kind("Deployment"):
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert {"checksum/config", "checksum/secret"} <= set(annotations)
    changed = parse("changed", {}, render({"config": {"logLevel": "DEBUG"}}))
    before = rendered if rendered.name == "default" else None
    if before is not None:
        old = before.get("Deployment", "ao-agent-orchestrator-api")
        new = changed.get("Deployment", "ao-agent-orchestrator-api")
        assert (
            old["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            != new["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        )


# ---- environment and configuration ----------------------------------------------------------


def test_no_duplicate_env_names(rendered: Rendered) -> None:
    for obj, pod in rendered.pod_specs():
        for container in _containers(pod):
            names = Counter(e["name"] for e in container.get("env", []))
            duplicates = [name for name, count in names.items() if count > 1]
            assert not duplicates, f"{obj['metadata']['name']}/{container['name']}: {duplicates}"


def test_settings_configmap_names_only_real_settings(rendered: Rendered) -> None:
    """Every ORCHESTRATOR_* key the chart sets is a field of the code's Settings."""
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    extra = set(rendered.values.get("config", {}).get("extraEnv", {}))
    unknown = set(_settings_configmap(rendered)) - fields - extra
    assert not unknown


def test_env_from_the_chart_names_real_settings(rendered: Rendered) -> None:
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    operator_only = {OPERATOR_PREFIX + name.upper() for name in OperatorSettings.model_fields}
    for obj, pod in rendered.pod_specs():
        if _component(obj) not in ORCHESTRATOR_COMPONENTS | {"migrations", "test"}:
            continue
        for container in _containers(pod):
            names = {e["name"] for e in container.get("env", [])}
            prefixed = {n for n in names if n.startswith(ENV_PREFIX)}
            assert prefixed - fields - operator_only == set(), obj["metadata"]["name"]


def test_every_component_knows_its_pod_name_and_service_name(rendered: Rendered) -> None:
    for obj, pod in rendered.pod_specs():
        component = _component(obj)
        if component not in ORCHESTRATOR_COMPONENTS:
            continue
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["ORCHESTRATOR_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["OTEL_SERVICE_NAME"]["value"] == f"agent-orchestrator-{component}"
        if rendered.values.get("otel", {}).get("enabled"):
            assert "OTEL_EXPORTER_OTLP_ENDPOINT" in env
            assert (
                "k8s.pod.name=$(ORCHESTRATOR_POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
            )
        else:
            assert env["OTEL_SDK_DISABLED"]["value"] == "true"


def test_secrets_come_from_secrets(rendered: Rendered) -> None:
    for _, pod in rendered.pod_specs():
        for container in _containers(pod):
            for entry in container.get("env", []):
                if entry["name"] in (
                    "ORCHESTRATOR_JWT_SECRET",
                    "ORCHESTRATOR_REDIS_URL",
                    "ORCHESTRATOR_DATABASE_URL",
                    "POSTGRES_PASSWORD",
                    "REDIS_PASSWORD",
                ):
                    assert "secretKeyRef" in entry["valueFrom"], entry["name"]


def test_tier_defaults_are_the_codes_defaults(all_rendered: dict[str, Rendered]) -> None:
    tiers = all_rendered["default"].get("ConfigMap", "ao-agent-orchestrator-tiers")
    parsed = parse_tiers_config(tiers["data"]["tiers.json"], {}, variable=TIERS_FILE_VARIABLE)
    assert parsed == dict(DEFAULT_TIERS)
    assert _settings_configmap(all_rendered["default"])["ORCHESTRATOR_TIERS_FILE"] == (
        "/etc/agent-orchestrator/tiers.json"
    )


def test_tier_overrides_parse_with_the_codes_parser(rendered: Rendered) -> None:
    tiers = rendered.get("ConfigMap", "ao-agent-orchestrator-tiers")["data"]["tiers.json"]
    parsed = parse_tiers_config(tiers, DEFAULT_TIERS, variable=TIERS_FILE_VARIABLE)
    assert _settings_configmap(rendered)["ORCHESTRATOR_DEFAULT_TIER"] in parsed


def test_images_default_to_app_version_and_accept_digests(
    all_rendered: dict[str, Rendered],
) -> None:
    default = all_rendered["default"].get("Deployment", "ao-agent-orchestrator-api")
    assert default["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        "/agent-orchestrator/agent-orchestrator-api:0.1.0"
    )
    production = all_rendered["production"]
    api = production.get("Deployment", "ao-agent-orchestrator-api")
    worker = production.get("Deployment", "ao-agent-orchestrator-worker")
    assert api["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.example.com/chat/agent-orchestrator-api:0.1.0@sha256:" + "0123456789abcdef" * 4
    )
    assert worker["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.example.com/chat/agent-orchestrator-worker:0.1.0@sha256:" + "fedcba9876543210" * 4
    )


def test_executor_operator_and_migrations_run_the_worker_image(
    all_rendered: dict[str, Rendered],
) -> None:
    rendered = all_rendered["everything"]
    worker_image = rendered.get("Deployment", "ao-agent-orchestrator-worker")["spec"]["template"][
        "spec"
    ]["containers"][0]["image"]
    commands = {}
    for obj, pod in rendered.pod_specs():
        if _component(obj) in ("executor", "operator", "migrations"):
            container = pod["containers"][0]
            assert container["image"] == worker_image
            assert "command" not in container, "keep the image's tini entrypoint"
            commands[_component(obj)] = container["args"]
    assert commands == {
        "executor": ["orchestrator", "executor"],
        "operator": ["orchestrator", "operator"],
        "migrations": ["orchestrator", "migrate"],
    }


# ---- exposure -------------------------------------------------------------------------------


def test_ingress_has_sticky_cookie_and_websocket_timeouts(rendered: Rendered) -> None:
    for ingress in rendered.of_kind("Ingress"):
        annotations = ingress["metadata"]["annotations"]
        if ingress["spec"].get("ingressClassName") != "nginx":
            continue
        assert annotations["nginx.ingress.kubernetes.io/affinity"] == "cookie"
        assert annotations["nginx.ingress.kubernetes.io/affinity-mode"] in (
            "balanced",
            "persistent",
        )
        assert annotations["nginx.ingress.kubernetes.io/session-cookie-name"]
        assert int(annotations["nginx.ingress.kubernetes.io/session-cookie-max-age"]) > 0
        assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
        assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600


def test_default_install_is_exposed_with_sticky_sessions(all_rendered: dict[str, Rendered]) -> None:
    assert all_rendered["default"].of_kind("Ingress")
    traefik = all_rendered["sentinel-rs256"]
    service = traefik.get("Service", "ao-agent-orchestrator-api")
    assert service["metadata"]["annotations"]["traefik.ingress.kubernetes.io/service.sticky.cookie"]


def test_gateway_route_has_session_persistence(all_rendered: dict[str, Rendered]) -> None:
    route = all_rendered["everything"].get("HTTPRoute", "ao-agent-orchestrator-api")
    rule = route["spec"]["rules"][0]
    assert rule["sessionPersistence"]["type"] == "Cookie"
    assert rule["backendRefs"][0]["name"] == "ao-agent-orchestrator-api"
    assert not all_rendered["everything"].of_kind("Ingress")


def test_websocket_port_is_marked_for_websockets(rendered: Rendered) -> None:
    service = rendered.get("Service", "ao-agent-orchestrator-api")
    http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    assert http["appProtocol"] == "kubernetes.io/ws"


# ---- RBAC and network policies --------------------------------------------------------------


def test_no_rbac_wildcards(rendered: Rendered) -> None:
    for role in rendered.of_kind("Role") + rendered.of_kind("ClusterRole"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), f"{role['metadata']['name']} {field}"
            assert "nonResourceURLs" not in rule


def _rules(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_operator_rbac_is_least_privilege(all_rendered: dict[str, Rendered]) -> None:
    """The rendered rules are the operator's `required_rules()`, nothing more (every scope and
    peering combination: tests/chart/test_operator_wiring.py)."""
    everything = all_rendered["everything"]  # two namespaces, namespaced peering
    roles = everything.of_kind("Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["chat", "tenants"]
    peering_name = everything.values["operator"]["peering"].get("name", "agent-orchestrator")
    expected = required_rules(clusterwide=False, peering_name=peering_name)
    assert all(r["rules"] == expected for r in roles)
    assert not everything.of_kind("ClusterRole")
    bindings = everything.of_kind("RoleBinding")
    assert {b["subjects"][0]["name"] for b in bindings} == {"ao-agent-orchestrator-operator"}

    cluster = all_rendered["sentinel-rs256"]  # cluster-wide, peering named by default
    (cluster_role,) = cluster.of_kind("ClusterRole")
    assert cluster_role["rules"] == required_rules(
        clusterwide=True, peering_name="agent-orchestrator"
    )
    assert not cluster.of_kind("Role")
    assert all_rendered["default"].of_kind("Role") == []
    for rendered in all_rendered.values():
        for role in rendered.of_kind("Role") + rendered.of_kind("ClusterRole"):
            for verb in ("get", "create", "update", "delete"):
                assert (
                    "orchestrator.agents.io",
                    "tierquotas",
                    verb,
                ) not in _rules(role), "kopf lists, watches and patches TierQuotas"


def test_network_policies_default_deny_and_narrow_the_api(rendered: Rendered) -> None:
    policies = {p["metadata"]["name"]: p for p in rendered.of_kind("NetworkPolicy")}
    if not rendered.values.get("networkPolicy", {}).get("enabled", True):
        assert not policies
        return
    deny = policies["ao-agent-orchestrator-default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny
    api = policies["ao-agent-orchestrator-api"]["spec"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in api["ingress"]}
    assert by_port["http"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"
    }
    assert by_port["metrics"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    for name, policy in policies.items():
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{name}: an ingress rule without peers admits everyone"


def test_in_chart_datastores_admit_only_release_pods(all_rendered: dict[str, Rendered]) -> None:
    rendered = all_rendered["default"]
    redis = rendered.get("NetworkPolicy", "ao-agent-orchestrator-redis")["spec"]
    peer = redis["ingress"][0]["from"][0]["podSelector"]["matchExpressions"]
    assert {"key": "app.kubernetes.io/instance", "operator": "In", "values": ["ao"]} in peer
    assert redis["egress"] == []


# ---- hooks, tests, monitoring ---------------------------------------------------------------


def test_migration_job_is_an_install_and_upgrade_hook(all_rendered: dict[str, Rendered]) -> None:
    job = all_rendered["production"].get("Job", "ao-agent-orchestrator-migrations")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    in_chart = all_rendered["default"].get("Job", "ao-agent-orchestrator-migrations")
    assert in_chart["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
    assert not all_rendered["minimal"].of_kind("Job"), "no database, no migrations"
    inline = all_rendered["sentinel-rs256"]
    secret = inline.get("Secret", "ao-agent-orchestrator-migrations")
    assert secret["metadata"]["annotations"]["helm.sh/hook-weight"] == "-10"


def test_helm_test_pod_checks_readiness_and_a_websocket(rendered: Rendered) -> None:
    pods = rendered.of_kind("Pod")
    if rendered.values.get("tests", {}).get("enabled", True) is False:
        assert not pods
        return
    (pod,) = pods
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "/health/ready" in script
    assert "/ws/" in script
    assert "connection.ack" in script


def test_monitoring_objects_need_their_api_or_force() -> None:
    plain = parse("plain", {}, render({}))
    assert not plain.of_kind("ServiceMonitor")
    assert not plain.of_kind("PrometheusRule")
    with_api = parse("api", {}, render({}, PROMETHEUS_OPERATOR_APIS))
    assert with_api.of_kind("ServiceMonitor")
    assert with_api.of_kind("PrometheusRule")
    forced = parse(
        "forced",
        {},
        render(
            {"monitoring": {"serviceMonitor": {"force": True}, "prometheusRule": {"force": True}}}
        ),
    )
    assert forced.of_kind("ServiceMonitor")
    assert forced.of_kind("PrometheusRule")
    disabled = parse(
        "off",
        {},
        render(
            {
                "monitoring": {
                    "serviceMonitor": {"enabled": False},
                    "prometheusRule": {"enabled": False},
                }
            },
            PROMETHEUS_OPERATOR_APIS + KEDA_APIS,
        ),
    )
    assert not disabled.of_kind("ServiceMonitor")
    assert not disabled.of_kind("PrometheusRule")


# Alerts (summary, runbook, scope) and the dashboard's queries (every metric and label exists in
# the code's registries, panels for every metric): tests/chart/test_observability.py.


def test_dashboard_configmap_has_the_sidecar_label(rendered: Rendered) -> None:
    maps = [
        m for m in rendered.of_kind("ConfigMap") if m["metadata"]["name"].endswith("-dashboards")
    ]
    if rendered.values.get("monitoring", {}).get("dashboard", {}).get("enabled", True) is False:
        assert not maps
        return
    (dashboards,) = maps
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    for path in (CHART_DIR / "dashboards").glob("*.json"):
        shipped = json.loads(dashboards["data"][path.name])
        assert shipped == json.loads(path.read_text()), f"{path.name} shipped as it is"


@pytest.mark.parametrize("name", ["default", "production", "everything"])
def test_notes_tell_how_to_connect(all_rendered: dict[str, Rendered], name: str) -> None:
    notes = all_rendered[name].notes
    assert "port-forward svc/ao-agent-orchestrator-api" in notes
    assert "Autoscaling:" in notes
    if name == "default":
        assert "not pinned by digest" in notes
        assert "single node" in notes
    if name == "production":
        assert "WARNINGS" not in notes, notes


@pytest.mark.parametrize("name", ["default", "production", "everything"])
def test_notes_print_only_urls_the_ingress_publishes(
    all_rendered: dict[str, Rendered], name: str
) -> None:
    """The production example publishes /api and /ws only: NOTES printed `https://host/`,
    which ingress-nginx answers with its default backend's 404, as if the install were broken."""
    rendered = all_rendered[name]
    ingresses = rendered.of_kind("Ingress")
    reach = rendered.notes.split("1. Reach the api", 1)[1].split("2. Get a client token", 1)[0]
    urls = re.findall(r"\b(?:https?|wss?)://\S+", reach)
    if not ingresses:
        assert not [url for url in urls if "127.0.0.1" not in url], rendered.notes
        return
    (ingress,) = ingresses
    published = [
        (rule["host"], path["path"].rstrip("/") + "/")
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    served = [url for url in urls if "127.0.0.1" not in url]
    assert served, rendered.notes
    for url in served:
        host, _, path = url.split("://", 1)[1].partition("/")
        assert any(host == h and f"/{path}".startswith(p) for h, p in published), (url, published)
    assert any("/ws/" in url for url in served), rendered.notes

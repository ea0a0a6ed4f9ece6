"""The rendered operator Deployment starts the operator the chart means to start.

The operator's container is rendered for each scope (the release namespace, a list of
namespaces, every namespace) with and without kopf peering; its env, as the kubelet would
build it (ConfigMap, Secrets, field references, `$(VAR)` expansion, the tiers ConfigMap mounted
at its path), is handed to the operator's own loaders and its args to `orchestrator`'s
argparse, exactly as `orchestrator operator` does at start. What kopf is then told (scope,
peering, liveness endpoint) must agree with the probe, the RBAC rules of
`services.operator.rbac.required_rules()` and the peering objects the chart renders.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import services.operator.main as operator_main
from services.cli.main import _run_operator, build_parser
from services.core.settings import ENV_PREFIX, Settings, load_settings
from services.core.tiers import DEFAULT_TIERS, load_tiers
from services.operator.rbac import required_rules
from services.operator.settings import OPERATOR_PREFIX, OperatorSettings, load_operator_settings
from tests.chart.conftest import NAMESPACE, Rendered, parse, render

OPERATOR = "ao-agent-orchestrator-operator"
POD_NAME = f"{OPERATOR}-7d9f8b6c5-x2x4q"
CONSOLE_SCRIPT = "orchestrator"  # [project.scripts] in pyproject.toml


@dataclass(frozen=True)
class Case:
    values: dict[str, Any]
    namespaces: list[str]  # what the operator must watch; [] is every namespace
    peering_name: str | None  # None: standalone


CASES = {
    "release-namespace": Case({"operator": {"enabled": True}}, [NAMESPACE], None),
    "namespaces-with-peering": Case(
        {
            "operator": {
                "enabled": True,
                "watchNamespaces": ["chat", "tenants"],
                "peering": {"enabled": True, "name": "tq-peering"},
            }
        },
        ["chat", "tenants"],
        "tq-peering",
    ),
    "all-namespaces": Case({"operator": {"enabled": True, "clusterWide": True}}, [], None),
    "all-namespaces-with-peering": Case(
        {"operator": {"enabled": True, "clusterWide": True, "peering": {"enabled": True}}},
        [],
        "agent-orchestrator",
    ),
}


@pytest.fixture(scope="module")
def renders() -> dict[str, Rendered]:
    return {name: parse(name, case.values, render(case.values)) for name, case in CASES.items()}


@dataclass
class Started:
    """What `orchestrator operator` built from the rendered container."""

    rendered: Rendered
    container: dict[str, Any]
    environment: dict[str, str]
    settings: Settings
    operator_settings: OperatorSettings
    kopf_arguments: dict[str, Any]


def _operator_container(rendered: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = rendered.get("Deployment", OPERATOR)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def _secret_value(rendered: Rendered, name: str, key: str) -> str:
    secret = rendered.get("Secret", name)
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def _mounted_paths(
    rendered: Rendered, pod: dict[str, Any], container: dict[str, Any], root: Path
) -> dict[str, Path]:
    """Write each ConfigMap volume under `root`; mount path -> where it is on this machine."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" not in volume:
            continue
        target = root / mount["name"]
        target.mkdir(parents=True)
        for key, text in rendered.get("ConfigMap", volume["configMap"]["name"])["data"].items():
            (target / key).write_text(text)
        mounts[mount["mountPath"]] = target
    return mounts


def container_environment(rendered: Rendered, root: Path) -> dict[str, str]:
    """The container's environment as the kubelet builds it, with mounted files on disk."""
    pod, container = _operator_container(rendered)
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        environment.update(rendered.get("ConfigMap", source["configMapRef"]["name"])["data"])
    fields = {"metadata.name": POD_NAME, "metadata.namespace": NAMESPACE}
    for entry in container.get("env", []):
        if "value" in entry:
            value = re.sub(
                r"\$\((\w+)\)", lambda m: environment.get(m[1], m[0]), str(entry["value"])
            )
        elif "fieldRef" in entry["valueFrom"]:
            value = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            value = _secret_value(rendered, ref["name"], ref["key"])
        environment[entry["name"]] = value
    for mount_path, local in _mounted_paths(rendered, pod, container, root).items():
        for name, value in environment.items():
            if value.startswith(mount_path + "/"):
                environment[name] = str(local / value.removeprefix(mount_path + "/"))
    return environment


def start(rendered: Rendered, root: Path, monkeypatch: pytest.MonkeyPatch) -> Started:
    """`orchestrator operator` up to the point where it would call `kopf.run`."""
    _, container = _operator_container(rendered)
    environment = container_environment(rendered, root)
    for name in list(os.environ):
        if name.startswith((ENV_PREFIX, "OTEL_", "KUBE")) or name == "POD_ID":
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    assert container["args"][0] == CONSOLE_SCRIPT
    args = build_parser().parse_args(container["args"][1:])
    assert args.handler is _run_operator
    settings = load_settings()
    operator_settings = load_operator_settings()
    scope = operator_main.resolve_scope(
        operator_settings, namespaces=args.namespace, all_namespaces=args.all_namespaces
    )
    # The registry (handlers over a Redis client) is the operator's tests' business.
    monkeypatch.setattr(operator_main, "build_operator", lambda *_: "registry")
    kopf_arguments = operator_main.operator_arguments(
        settings,
        operator_settings,
        scope,
        standalone=True if args.standalone else None,
        priority=args.priority,
    )
    return Started(rendered, container, environment, settings, operator_settings, kopf_arguments)


@pytest.fixture(params=list(CASES))
def case_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def started(
    case_name: str,
    renders: dict[str, Rendered],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Started:
    return start(renders[case_name], tmp_path, monkeypatch)


def test_operator_env_names_only_the_operators_settings(
    case_name: str, renders: dict[str, Rendered]
) -> None:
    """`OperatorSettings` ignores unknown variables: a misspelt name would be silently lost."""
    _, container = _operator_container(renders[case_name])
    fields = {OPERATOR_PREFIX + name.upper() for name in OperatorSettings.model_fields}
    rendered = {e["name"] for e in container["env"] if e["name"].startswith(OPERATOR_PREFIX)}
    assert rendered, "the operator's settings come from the chart's values"
    assert rendered <= fields, f"not operator settings: {rendered - fields}"


def test_operator_starts_with_the_rendered_env_and_args(case_name: str, started: Started) -> None:
    case = CASES[case_name]
    wiring = started.kopf_arguments
    assert wiring["namespaces"] == case.namespaces
    assert wiring["clusterwide"] is (case.namespaces == [])
    assert wiring["peering_name"] == case.peering_name
    assert wiring["standalone"] is (case.peering_name is None)
    assert started.settings.pod_name == POD_NAME
    assert started.environment["POD_ID"] == POD_NAME, "kopf's peering identity is the pod"
    assert started.operator_settings.refresh_seconds == 60
    assert load_tiers(started.settings).keys() >= DEFAULT_TIERS.keys(), "tiers file mounted"


def test_liveness_probe_targets_the_endpoint_kopf_serves(started: Started) -> None:
    endpoint = urlsplit(started.kopf_arguments["liveness_endpoint"])
    probe = started.container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in started.container["ports"]}
    port = ports.get(probe["port"], probe["port"])
    assert (port, probe["path"]) == (endpoint.port, endpoint.path)
    assert endpoint.hostname == "0.0.0.0", "reachable by the kubelet, not only on loopback"


def test_operator_rbac_is_exactly_the_required_rules(case_name: str, started: Started) -> None:
    wiring = started.kopf_arguments
    expected = required_rules(
        clusterwide=wiring["clusterwide"], peering_name=wiring["peering_name"]
    )
    rendered = started.rendered
    account = rendered.get("Deployment", OPERATOR)["spec"]["template"]["spec"]["serviceAccountName"]
    subject = {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    if wiring["clusterwide"]:
        assert not rendered.of_kind("Role")
        assert not rendered.of_kind("RoleBinding")
        (role,) = rendered.of_kind("ClusterRole")
        assert role["rules"] == expected
        (binding,) = rendered.of_kind("ClusterRoleBinding")
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"] == [subject]
        return
    assert not rendered.of_kind("ClusterRole")
    roles = rendered.of_kind("Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(wiring["namespaces"])
    assert all(role["rules"] == expected for role in roles), case_name
    bindings = rendered.of_kind("RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(wiring["namespaces"])
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": OPERATOR,
        }
        assert binding["subjects"] == [subject]


def test_peering_objects_exist_where_the_operator_looks_for_them(started: Started) -> None:
    """kopf treats a named peering as mandatory: it waits until the object exists."""
    wiring = started.kopf_arguments
    rendered = started.rendered
    namespaced = rendered.of_kind("KopfPeering")
    clustered = rendered.of_kind("ClusterKopfPeering")
    if wiring["peering_name"] is None:
        assert not namespaced
        assert not clustered
    elif wiring["clusterwide"]:
        assert not namespaced
        (peering,) = clustered
        assert peering["metadata"]["name"] == wiring["peering_name"]
        assert "namespace" not in peering["metadata"]
    else:
        assert not clustered
        assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in namespaced) == [
            (namespace, wiring["peering_name"]) for namespace in sorted(wiring["namespaces"])
        ]

"""`orchestrator operator`: what it does before kopf starts, as a person at a terminal sees it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.core.settings import ConfigError
from services.operator.main import cluster_source, resolve_scope
from services.operator.settings import OperatorSettings, load_operator_settings

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")
        and not key.startswith("ORCHESTRATOR_")
    }
    environ.update(HOME=str(home), **env)
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_a_cluster_the_operator_exits_with_one_clear_line(tmp_path: Path) -> None:
    result = run_cli("operator", home=tmp_path)

    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no Kubernetes cluster configured" in lines[0]
    assert "KUBECONFIG" in lines[0]


def test_a_bad_operator_setting_names_its_variable(tmp_path: Path) -> None:
    result = run_cli("operator", home=tmp_path, ORCHESTRATOR_OPERATOR_REFRESH_SECONDS="0")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "orchestrator: configuration error: ORCHESTRATOR_OPERATOR_REFRESH_SECONDS: "
        "Input should be greater than or equal to 1"
    ]


def test_the_help_lists_the_operator_options(tmp_path: Path) -> None:
    result = run_cli("operator", "--help", home=tmp_path)

    assert result.returncode == 0
    for option in ("--namespace", "--all-namespaces", "--standalone", "--priority"):
        assert option in result.stdout


def test_cluster_credentials_are_found_in_kubectls_order(tmp_path: Path) -> None:
    token = tmp_path / "token"
    home_config = tmp_path / "config"
    assert cluster_source({}, token=token, home_config=home_config) is None

    token.write_text("t")
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert cluster_source(pod, token=token, home_config=home_config) == "service-account"
    explicit = {**pod, "KUBECONFIG": "/somewhere"}
    assert cluster_source(explicit, token=token, home_config=home_config) == "kubeconfig"

    token.unlink()
    home_config.write_text("{}")
    assert cluster_source({}, token=token, home_config=home_config) == "kubeconfig"


def test_namespaces_come_from_the_command_line_then_the_environment() -> None:
    configured = OperatorSettings(namespaces=["team-a", "team-b"])

    assert resolve_scope(configured).namespaces == ("team-a", "team-b")
    assert resolve_scope(configured, namespaces=["ops"]).namespaces == ("ops",)
    assert resolve_scope(configured, all_namespaces=True).clusterwide
    assert resolve_scope(OperatorSettings()).clusterwide
    with pytest.raises(ConfigError, match="exclude each other"):
        resolve_scope(configured, namespaces=["ops"], all_namespaces=True)
    with pytest.raises(ConfigError, match="--namespace: 'Team_A' is not a valid Kubernetes name"):
        resolve_scope(configured, namespaces=["Team_A"])


def test_operator_settings_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_OPERATOR_NAMESPACES", "tenants,tenants,ops")
    monkeypatch.setenv("ORCHESTRATOR_OPERATOR_PEERING", "false")
    settings = load_operator_settings()

    assert settings.namespaces == ["tenants", "ops"]
    assert settings.peering is False
    assert settings.contender_ttl == 3 * settings.refresh_seconds
    monkeypatch.setenv("ORCHESTRATOR_OPERATOR_PEERING_NAME", "Not A Name")
    with pytest.raises(ConfigError, match="ORCHESTRATOR_OPERATOR_PEERING_NAME"):
        load_operator_settings()


def test_an_unreachable_api_server_ends_the_operator_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    from services.cli.embedded import free_port
    from services.core.settings import load_settings
    from services.operator.main import ClusterUnreachable, Scope, operator_arguments, serve

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        "contexts: [{name: x, context: {cluster: x, user: x}}]\n"
        f'clusters: [{{name: x, cluster: {{server: "http://127.0.0.1:{free_port()}"}}}}]\n'
        "users: [{name: x, user: {token: t}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    arguments = operator_arguments(
        load_settings(redis_url=redis_url),
        OperatorSettings(liveness_port=0),
        Scope(("tenants",)),
        standalone=True,
    )
    arguments["settings"].networking.error_backoffs = [0.01]  # give up at once, not after 54 s

    with pytest.raises(ClusterUnreachable, match="cannot reach the Kubernetes API server") as err:
        serve(arguments)
    assert "\n" not in str(err.value)

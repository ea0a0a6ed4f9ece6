"""skaffold.yaml (no skaffold binary here): artifacts exist, and every value it sets is a value
the chart's schema knows, so `skaffold dev` cannot fail on a renamed key."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART_DIR, ROOT, render

SKAFFOLD = ROOT / "skaffold.yaml"


@pytest.fixture(scope="module")
def skaffold() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SKAFFOLD.read_text())
    return loaded


def _release(config: dict[str, Any]) -> dict[str, Any]:
    (release,) = config["manifests"]["helm"]["releases"]
    return release


def _artifact_variable(image: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", image)


def _schema_has(schema: dict[str, Any], path: str) -> bool:
    node: Any = schema
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            node = node.get("items")
        else:
            properties = node.get("properties", {})
            node = properties.get(part)
        if not isinstance(node, dict):
            return False
    return True


def test_schema_version_is_current(skaffold: dict[str, Any]) -> None:
    assert re.fullmatch(r"skaffold/v4beta\d+", skaffold["apiVersion"])
    assert skaffold["kind"] == "Config"


def test_every_artifact_context_and_dockerfile_exist(skaffold: dict[str, Any]) -> None:
    artifacts = skaffold["build"]["artifacts"]
    assert {a["image"] for a in artifacts} == {
        "agent-orchestrator-api",
        "agent-orchestrator-worker",
    }
    for artifact in artifacts:
        context = ROOT / artifact.get("context", ".")
        assert context.is_dir()
        assert (context / artifact["docker"]["dockerfile"]).is_file(), artifact["image"]


def test_each_artifact_sets_its_image_repository_and_tag(skaffold: dict[str, Any]) -> None:
    templates = _release(skaffold)["setValueTemplates"]
    for artifact in skaffold["build"]["artifacts"]:
        variable = _artifact_variable(artifact["image"])
        component = artifact["image"].removeprefix("agent-orchestrator-")
        assert templates[f"{component}.image.repository"] == f"{{{{.IMAGE_REPO_{variable}}}}}"
        assert f"{{{{.IMAGE_TAG_{variable}}}}}" in templates[f"{component}.image.tag"]


def test_every_value_skaffold_sets_is_in_the_schema(
    skaffold: dict[str, Any], chart_schema: dict[str, Any]
) -> None:
    release = _release(skaffold)
    paths = list(release.get("setValueTemplates", {})) + list(release.get("setValues", {}))
    for profile in skaffold.get("profiles", []):
        for patch in profile.get("patches", []):
            if patch["path"].endswith("/setValues"):
                paths += list(patch["value"])
            elif "/setValueTemplates/" in patch["path"]:
                paths.append(patch["path"].rsplit("/", 1)[1])
    assert paths
    missing = [p for p in paths if not _schema_has(chart_schema, p)]
    assert not missing


def test_chart_path_and_port_forward_match_the_chart(skaffold: dict[str, Any]) -> None:
    release = _release(skaffold)
    assert (ROOT / release["chartPath"]).resolve() == CHART_DIR.resolve()
    (forward,) = skaffold["portForward"]
    rendered = render({}, ())
    services = "\n".join(rendered.values())
    expected = forward["resourceName"].replace("agent-orchestrator", "ao-agent-orchestrator", 1)
    assert f"name: {expected}\n" in services, "the api Service is <release>-api"
    assert forward["port"] == 80


def test_skaffold_style_values_render(skaffold: dict[str, Any]) -> None:
    """What skaffold passes (repository without registry, tag@digest, dev profile) renders."""
    manifests = render(
        {
            "api": {
                "image": {
                    "registry": "",
                    "repository": "agent-orchestrator-api",
                    "tag": "abc1234@sha256:" + "a" * 64,
                }
            },
            "worker": {
                "image": {
                    "registry": "",
                    "repository": "agent-orchestrator-worker",
                    "tag": "abc1234@",
                }
            },
            "executor": {"enabled": True},
            "autoscaling": {"mode": "none"},
        }
    )
    text = "\n".join(manifests.values())
    assert "image: agent-orchestrator-api:abc1234@sha256:" + "a" * 64 in text
    assert "image: agent-orchestrator-worker:abc1234\n" in text

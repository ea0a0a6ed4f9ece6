"""Helpers of the chart tests: a rendered container's environment as its process sees it.

The chart's objects come from the real Helm SDK (tests/chart/conftest.py); a container's env is
its envFrom ConfigMaps, then `env` (which wins), with each secretKeyRef read from the Secrets
the platform team created (docs/kubernetes.md, "Install"), as the kubelet would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.chart.conftest import Rendered

ORCHESTRATOR = str(Path(sys.executable).parent / "orchestrator")
TIERS_FILE = "/etc/agent-orchestrator/tiers.json"


def container_of(obj: dict[str, Any], name: str) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        spec = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    else:
        spec = obj["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == name]
    return container


def process_env(
    rendered: Rendered,
    container: dict[str, Any],
    secrets: dict[tuple[str, str], str],
    tiers_dir: Path,
) -> dict[str, str]:
    """What the container's process sees; the tiers file is written under `tiers_dir`."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        env.update(rendered.get("ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]
        if "secretKeyRef" in ref:
            key = (ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
            if key in secrets:
                env[entry["name"]] = secrets[key]
            else:
                assert ref["secretKeyRef"].get("optional"), f"no Secret {key} for {entry}"
        elif "fieldRef" in ref:
            env[entry["name"]] = "pod-0"
    if env.get("ORCHESTRATOR_TIERS_FILE") == TIERS_FILE:
        tiers = rendered.get("ConfigMap", "ao-agent-orchestrator-tiers")["data"]["tiers.json"]
        (tiers_dir / "tiers.json").write_text(tiers)
        env["ORCHESTRATOR_TIERS_FILE"] = str(tiers_dir / "tiers.json")
    return env


def run(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`args` in a process with exactly `env` (plus PATH and HOME), as in the pod."""
    full = {"PATH": os.environ.get("PATH", ""), "HOME": str(Path.home()), **env}
    return subprocess.run(
        [ORCHESTRATOR, *args[1:]] if args[0] == "orchestrator" else args,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )

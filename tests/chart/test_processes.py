"""The rendered configuration against the real processes (no cluster: the same env, files and
scripts the pods get, given to a real `orchestrator api` on a real Redis).

- the settings ConfigMap and the tiers file are accepted by the api as they are rendered;
- the `helm test` script passes against a live api (readiness + WebSocket connection.ack);
- the preStop hook's GET /drain on the metrics port answers, and readiness turns 503 after it.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from tests.chart.conftest import Rendered

SECRET = "chart-test-secret-0123456789abcdef0123"


@pytest.fixture(scope="module")
def api(
    all_rendered: dict[str, Rendered],
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Child]:
    rendered = all_rendered["everything"]  # extra env, a new tier and an override
    folder = tmp_path_factory.mktemp("pod")
    tiers = rendered.get("ConfigMap", "ao-agent-orchestrator-tiers")["data"]["tiers.json"]
    (folder / "tiers.json").write_text(tiers)
    settings = dict(rendered.get("ConfigMap", "ao-agent-orchestrator-config")["data"])
    settings["ORCHESTRATOR_TIERS_FILE"] = str(folder / "tiers.json")
    stack = LocalStack.for_redis(redis_server.url, log_dir=folder, jwt_secret=SECRET)
    for name, value in settings.items():
        if name != "ORCHESTRATOR_METRICS_PORT":  # the stack picks free ports
            stack.env[name] = value
    try:
        child = stack.start_api()
        stack.wait_ready(child)
        yield child
    finally:
        stack.stop()


def test_helm_test_script_passes_against_a_live_api(
    api: Child, all_rendered: dict[str, Rendered]
) -> None:
    (pod,) = all_rendered["default"].of_kind("Pod")
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    script = container["args"][0]
    bin_dir = str(Path(sys.executable).parent)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={
            "API_URL": api.url,
            "ORCHESTRATOR_JWT_SECRET": SECRET,
            "ORCHESTRATOR_JWT_ALGORITHM": "HS256",
            "PATH": bin_dir,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr + api.output()
    assert "connection.ack received" in result.stdout


def test_prestop_drain_answers_and_readiness_turns_unready(api: Child) -> None:
    drain = urllib.request.Request(  # as the chart's preStop httpGet sends it
        f"http://127.0.0.1:{api.metrics_port}/drain", headers={"X-Orchestrator-Drain": "preStop"}
    )
    with urllib.request.urlopen(drain, timeout=30) as reply:  # noqa: S310
        assert reply.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{api.url}/health/ready", timeout=5)  # noqa: S310
    assert refused.value.code == 503
    with urllib.request.urlopen(f"{api.url}/health", timeout=5) as reply:  # noqa: S310
        assert reply.status == 200, "liveness stays up while draining"

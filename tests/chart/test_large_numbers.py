"""A schema-valid number in values reaches the processes as that number.

Helm reads every YAML number as float64, and `quote`/`toString` print one of 1 000 000 or more
in exponent form (`2e+06`): an integer setting rendered that way passes the values schema, then
stops every pod at start (`Input should be a valid integer`, exit 2), and KEDA cannot parse its
`lagCount`. The chart must write integers as integers and keep fractions (0.5) as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cli.embedded import RedisServer
from services.cli.stack import LocalStack
from tests.chart.conftest import KEDA_APIS, Rendered, parse, render

SECRET = "chart-test-secret-0123456789abcdef0123"

# Every number of values that the chart writes into an env var or a config file, set large: at
# least 10**6 where the schema allows it, else at the schema's maximum (the Settings' bound).
LARGE: dict[str, Any] = {
    "config": {
        "maxWebsocketConnections": 3_000_000,
        "websocketPingInterval": 3600,
        "websocketPingTimeout": 0.5,
        "historyRetentionDays": 36_500,
        "validationCacheTtl": 86_400,
        "extraEnv": {
            "ORCHESTRATOR_PERSIST_STREAM_MAXLEN": 2_000_000,
            "A_FRACTION": 0.25,
            "A_LARGE_FRACTION": 1_234_567.5,
            "A_FLAG": True,
            "A_STRING": "1e+06",
        },
    },
    "externalRedis": {"maxConnections": 100_000},
    "api": {
        "drain": {"seconds": 3600},
        "autoscaling": {"targetConnectionsPerPod": 1_000_000},
    },
    "worker": {"autoscaling": {"targetLagPerPod": 5_000_000, "activationLag": 1_000_000}},
    "executor": {"concurrency": 100_000, "chunkDelayMs": 59_999.5},
    "operator": {"enabled": True, "refreshSeconds": 86_400_000},
    "monitoring": {"prometheusRule": {"force": True, "streamLag": 2_000_000}},
}

EXPECTED_SETTINGS = {
    "ORCHESTRATOR_MAX_WEBSOCKET_CONNECTIONS": "3000000",
    "ORCHESTRATOR_WEBSOCKET_PING_INTERVAL": "3600",
    "ORCHESTRATOR_WEBSOCKET_PING_TIMEOUT": "0.5",
    "ORCHESTRATOR_HISTORY_RETENTION_DAYS": "36500",
    "ORCHESTRATOR_VALIDATION_CACHE_TTL": "86400",
    "ORCHESTRATOR_DRAIN_SECONDS": "3600",
    "ORCHESTRATOR_EXECUTOR_CONCURRENCY": "100000",
    "ORCHESTRATOR_EXECUTOR_CHUNK_DELAY_MS": "59999.5",
    "ORCHESTRATOR_REDIS_MAX_CONNECTIONS": "100000",
    "ORCHESTRATOR_PERSIST_STREAM_MAXLEN": "2000000",
    "A_FRACTION": "0.25",
    "A_LARGE_FRACTION": "1234567.5",
    "A_FLAG": "true",
    "A_STRING": "1e+06",
}


def _with_mode(mode: str) -> dict[str, Any]:
    return {**LARGE, "autoscaling": {"mode": mode}}


def _rendered(values: dict[str, Any], api_versions: tuple[str, ...] = ()) -> Rendered:
    return parse("large-numbers", values, render(values, api_versions))


def _config_map(rendered: Rendered, suffix: str) -> dict[str, str]:
    (config,) = [o for o in rendered.of_kind("ConfigMap") if o["metadata"]["name"].endswith(suffix)]
    data: dict[str, str] = config["data"]
    return data


@pytest.fixture(scope="module")
def hpa_release() -> Rendered:
    return _rendered(_with_mode("hpa"))


@pytest.fixture(scope="module")
def keda_release() -> Rendered:
    return _rendered(_with_mode("keda"), KEDA_APIS)


def test_settings_config_map_writes_integers_as_integers(hpa_release: Rendered) -> None:
    data = _config_map(hpa_release, "-config")
    rendered = {name: data[name] for name in EXPECTED_SETTINGS}
    assert rendered == EXPECTED_SETTINGS


def test_operator_env_writes_integers_as_integers(hpa_release: Rendered) -> None:
    (operator,) = [
        o for o in hpa_release.of_kind("Deployment") if o["metadata"]["name"].endswith("-operator")
    ]
    env = {
        e["name"]: e.get("value")
        for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["ORCHESTRATOR_OPERATOR_REFRESH_SECONDS"] == "86400000"


def test_hpa_targets_are_integers(hpa_release: Rendered) -> None:
    targets = {
        hpa["metadata"]["name"]: [
            metric[metric["type"][0].lower() + metric["type"][1:]]["target"].get("averageValue")
            for metric in hpa["spec"]["metrics"]
        ]
        for hpa in hpa_release.of_kind("HorizontalPodAutoscaler")
    }
    assert targets == {
        "ao-agent-orchestrator-api": ["1000000", None],
        "ao-agent-orchestrator-worker": ["5000000"],
    }


def test_keda_trigger_metadata_are_integers(keda_release: Rendered) -> None:
    triggers = [t for o in keda_release.of_kind("ScaledObject") for t in o["spec"]["triggers"]]
    api = next(t for t in triggers if t["type"] == "prometheus")
    assert api["metadata"]["threshold"] == "1000000"
    lags = {
        (t["metadata"]["lagCount"], t["metadata"]["activationLagCount"])
        for t in triggers
        if t["type"].endswith("-streams")
    }
    assert lags == {("5000000", "1000000")}


def test_alert_thresholds_are_integers(hpa_release: Rendered) -> None:
    (rule,) = hpa_release.of_kind("PrometheusRule")
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert exprs["OrchestratorStreamLag"].rstrip().endswith("> 2000000")
    assert exprs["OrchestratorPodNearConnectionCap"].rstrip().endswith("* 3000000")


def test_tiers_file_writes_integers_as_integers() -> None:
    limits = {"maxConnections": 10_000_000, "requestsPerMinutePerTenant": 60_000_000}
    rendered = _rendered({**LARGE, "tiers": {"free": limits}})
    tiers = json.loads(_config_map(rendered, "-tiers")["tiers.json"])
    assert {name: tiers["free"][name] for name in limits} == limits
    assert "e+" not in _config_map(rendered, "-tiers")["tiers.json"]


@pytest.fixture
def stack(redis_server: RedisServer, tmp_path: Path) -> Iterator[LocalStack]:
    stack = LocalStack.for_redis(redis_server.url, log_dir=tmp_path, jwt_secret=SECRET)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.mark.parametrize(
    "values",
    [
        # The reported cases: the default maxlen is already 1 000 000, any raise renders 2e+06.
        {"config": {"extraEnv": {"ORCHESTRATOR_PERSIST_STREAM_MAXLEN": 2_000_000}}},
        {"config": {"maxWebsocketConnections": 1_000_000}},
    ],
    ids=["extraEnv-persist-stream-maxlen", "max-websocket-connections"],
)
def test_the_api_starts_with_a_rendered_large_number(
    stack: LocalStack, tmp_path: Path, values: dict[str, Any]
) -> None:
    rendered = _rendered(values)
    (tmp_path / "tiers.json").write_text(_config_map(rendered, "-tiers")["tiers.json"])
    settings = _config_map(rendered, "-config")
    settings["ORCHESTRATOR_TIERS_FILE"] = str(tmp_path / "tiers.json")
    for name, value in settings.items():
        if name != "ORCHESTRATOR_METRICS_PORT":  # the stack picks free ports
            stack.env[name] = value
    try:
        stack.wait_ready(stack.start_api())
    except RuntimeError as refused:
        pytest.fail(f"values {values} rendered {settings}; the api refused them: {refused}")

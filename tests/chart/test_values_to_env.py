"""docs/kubernetes.md, values table: every row whose description names an `ORCHESTRATOR_*`
variable. Each value is set to something other than its default; the variable the row names
must reach the container with that value (from the settings ConfigMap, the container's `env`
or the Secret it references), and the variable must be one the code reads (Settings /
OperatorSettings): test_invariants checks that the ConfigMap's keys are Settings fields, this
that each documented value lands in the variable its row names.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from services.core.settings import ENV_PREFIX, Settings
from services.operator.settings import OPERATOR_PREFIX, OperatorSettings
from tests.chart.conftest import ROOT, Rendered, parse, render

DOC = ROOT / "docs" / "kubernetes.md"
JWT = {"auth": {"secret": "s" * 64}}
EXTERNAL = {"redis": {"enabled": False}, "externalRedis": {"url": "redis://r.example:6379/0"}}

# row -> (values, the variable's expected text, container holding it)
CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    "config.logLevel": ({"config": {"logLevel": "DEBUG"}}, "DEBUG", "api"),
    "config.defaultTier": ({"config": {"defaultTier": "pro"}}, "pro", "api"),
    "config.allowedOrigins": (
        {"config": {"allowedOrigins": ["https://a.example", "https://b.example:8443"]}},
        "https://a.example,https://b.example:8443",
        "api",
    ),
    "config.maxWebsocketConnections": (
        {"config": {"maxWebsocketConnections": 2000}},
        "2000",
        "api",
    ),
    "config.websocketPingInterval": ({"config": {"websocketPingInterval": 45}}, "45", "api"),
    "config.websocketPingTimeout": ({"config": {"websocketPingTimeout": 15}}, "15", "api"),
    "config.websocketCompression": ({"config": {"websocketCompression": True}}, "true", "api"),
    "config.callbackPartitions": ({"config": {"callbackPartitions": 4}}, "4", "worker"),
    "config.historyRetentionDays": ({"config": {"historyRetentionDays": 7}}, "7", "worker"),
    "config.validationCacheTtl": ({"config": {"validationCacheTtl": 60}}, "60", "api"),
    "config.metricsPort": ({"config": {"metricsPort": 9191}}, "9191", "worker"),
    "auth.algorithm": ({"auth": {"algorithm": "HS512", "secret": "s" * 64}}, "HS512", "api"),
    "auth.jwksRefreshSeconds": (
        {
            "auth": {
                "algorithm": "RS256",
                "jwksUrl": "https://idp.example/jwks",
                "jwksRefreshSeconds": 120,
            }
        },
        "120",
        "api",
    ),
    "auth.audience": ({"auth": {"secret": "s" * 64, "audience": "chat"}}, "chat", "api"),
    "auth.issuer": (
        {"auth": {"secret": "s" * 64, "issuer": "https://idp.example"}},
        "https://idp.example",
        "api",
    ),
    "externalRedis.mode": (
        {
            "redis": {"enabled": False},
            "externalRedis": {"mode": "sentinel", "sentinels": ["s:26379"]},
        },
        "sentinel",
        "worker",
    ),
    "externalRedis.url": (EXTERNAL, "redis://r.example:6379/0", "worker"),
    "externalRedis.sentinels": (
        {
            "redis": {"enabled": False},
            "externalRedis": {"mode": "sentinel", "sentinels": ["a:26379", "b:26379"]},
        },
        "a:26379,b:26379",
        "api",
    ),
    "externalRedis.sentinelMaster": (
        {
            "redis": {"enabled": False},
            "externalRedis": {"mode": "sentinel", "sentinels": ["a:26379"], "sentinelMaster": "m2"},
        },
        "m2",
        "api",
    ),
    "externalRedis.maxConnections": ({"externalRedis": {"maxConnections": 100}}, "100", "worker"),
    "externalDatabase.url": (
        {
            "postgresql": {"enabled": False},
            "externalDatabase": {"url": "postgresql://u:p@db.example:5432/c"},
        },
        "postgresql://u:p@db.example:5432/c",
        "worker",
    ),
    "api.drain.seconds": ({"api": {"drain": {"seconds": 50}}}, "50", "api"),
    "executor.concurrency": ({"executor": {"enabled": True, "concurrency": 16}}, "16", "executor"),
    "executor.chunkDelayMs": ({"executor": {"enabled": True, "chunkDelayMs": 5}}, "5", "executor"),
    "operator.peering.name": (
        {"operator": {"enabled": True, "peering": {"enabled": True, "name": "chat-peering"}}},
        "chat-peering",
        "operator",
    ),
    "operator.livenessPort": (
        {"operator": {"enabled": True, "livenessPort": 8181}},
        "8181",
        "operator",
    ),
    "operator.refreshSeconds": (
        {"operator": {"enabled": True, "refreshSeconds": 30}},
        "30",
        "operator",
    ),
}


def _documented() -> dict[str, str]:
    rows = re.findall(
        r"^\| `([\w.]+)` \| `[^`]*` \| `?(ORCHESTRATOR_[A-Z_]+)", DOC.read_text(), re.M
    )
    return dict(rows)


def _env(rendered: Rendered, component: str) -> dict[str, str]:
    deployment = rendered.get("Deployment", f"ao-agent-orchestrator-{component}")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        env.update(rendered.get("ConfigMap", source["configMapRef"]["name"])["data"])
    secrets = {
        (s["metadata"]["name"], key): base64.b64decode(value).decode()
        for s in rendered.of_kind("Secret")
        for key, value in (s.get("data") or {}).items()
    }
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif "secretKeyRef" in entry["valueFrom"]:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets.get((ref["name"], ref["key"]), "<external Secret>")
    return env


def test_every_documented_variable_row_is_covered_here() -> None:
    assert set(_documented()) == set(CASES)


@pytest.mark.parametrize("row", list(CASES))
def test_documented_value_reaches_the_variable_its_row_names(row: str) -> None:
    variable = _documented()[row]
    fields = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    fields |= {OPERATOR_PREFIX + f.upper() for f in OperatorSettings.model_fields}
    assert variable in fields, f"{variable} is read by no settings class"
    values, expected, component = CASES[row]
    values = {**JWT, **values}
    env = _env(parse(row, values, render(values)), component)
    assert env.get(variable) == expected, f"{component}: {variable}={env.get(variable)!r}"

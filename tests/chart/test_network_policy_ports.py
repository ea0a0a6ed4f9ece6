"""The NetworkPolicies let out the port of every address the chart is given inline (an
`externalRedis.url`, `sentinels`, an `externalDatabase.url`, `otel.endpoint`), as they do for
`auth.jwksUrl`: a datastore on a port `networkPolicy.*.ports` lacks (TLS Redis on 6380,
sentinels on 5000, PgBouncer on 6432) left every api and worker pod timing out at start, with
nothing at install time saying why."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.conftest import parse, render

JWT = {"auth": {"secret": "s" * 64}}


def _egress_ports(policy: dict[str, Any]) -> list[int]:
    return [
        port["port"]
        for rule in policy["spec"].get("egress") or []
        for port in rule.get("ports") or []
        if port.get("protocol") == "TCP"
    ]


CASES: dict[str, tuple[dict[str, Any], int, tuple[str, ...]]] = {
    "externalRedis.url on 6380 (TLS)": (
        {
            "redis": {"enabled": False},
            "externalRedis": {"url": "rediss://:pw@redis.example:6380/0"},
        },
        6380,
        ("api", "worker"),
    ),
    "externalRedis.sentinels on 5000": (
        {
            "redis": {"enabled": False},
            "externalRedis": {"mode": "sentinel", "sentinels": ["s0.example:5000", "s1:26379"]},
        },
        5000,
        ("api", "worker"),
    ),
    "externalDatabase.url on 6432 (PgBouncer)": (
        {
            "postgresql": {"enabled": False},
            "externalDatabase": {"url": "postgresql://u:pw@pgbouncer.example:6432/chat"},
        },
        6432,
        ("api", "worker", "migrations", "prune"),
    ),
    "otel.endpoint on 14318": (
        {"otel": {"enabled": True, "endpoint": "http://collector.observability.svc:14318"}},
        14318,
        ("api", "worker"),
    ),
    "otel.endpoint on https without a port": (
        {"otel": {"enabled": True, "endpoint": "https://collector.example"}},
        443,
        ("api", "worker"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_port_of_an_inline_address_is_let_out(case: str) -> None:
    values, port, components = CASES[case]
    values = {**JWT, **values}
    rendered = parse(case, values, render(values))
    for component in components:
        policy = rendered.get("NetworkPolicy", f"ao-agent-orchestrator-{component}")
        ports = _egress_ports(policy)
        assert port in ports, f"{component}: {ports}"
        assert ports.count(port) == 1, f"{component}: {ports}"


def test_an_address_in_a_secret_gets_the_listed_ports_only() -> None:
    """The chart cannot see a URL in existingSecret: the listed ports, each once."""
    values = {
        **JWT,
        "redis": {"enabled": False},
        "externalRedis": {"existingSecret": "redis", "url": ""},
        "networkPolicy": {"externalRedis": {"ports": [6380]}},
    }
    rendered = parse("secret", values, render(values))
    ports = _egress_ports(rendered.get("NetworkPolicy", "ao-agent-orchestrator-api"))
    assert 6380 in ports
    assert 6379 not in ports
    assert 26379 not in ports

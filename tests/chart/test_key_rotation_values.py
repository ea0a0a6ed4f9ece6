"""The chart's values for rotating token keys (README "Client API"): the previous HS secret and
an identity provider's key set reach the api as the settings the code reads, the api may reach
the provider through the NetworkPolicy, and combinations that cannot work are refused."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from helm_python import HelmError

from services.core.settings import Settings
from tests.chart.conftest import Rendered, parse, render

JWKS = "https://idp.example.com/.well-known/jwks.json"
ENV_PREFIX = "ORCHESTRATOR_"


def rendered(values: dict[str, Any]) -> Rendered:
    base = {"redis": {"password": "r" * 32}, "postgresql": {"password": "p" * 32}}
    return parse("rotation", values, render({**base, **values}))


def api_env(chart: Rendered) -> dict[str, dict[str, Any]]:
    api = chart.get("Deployment", "ao-agent-orchestrator-api")
    return {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}


def settings(chart: Rendered) -> dict[str, str]:
    data: dict[str, str] = chart.get("ConfigMap", "ao-agent-orchestrator-config")["data"]
    return data


def test_the_previous_secret_reaches_the_api_from_the_charts_secret() -> None:
    chart = rendered({"auth": {"secret": "n" * 64, "previousSecret": "o" * 64}})
    ref = api_env(chart)["ORCHESTRATOR_JWT_PREVIOUS_SECRET"]["valueFrom"]["secretKeyRef"]
    secret = chart.get("Secret", ref["name"])
    assert base64.b64decode(secret["data"][ref["key"]]).decode() == "o" * 64
    assert "jwt_previous_secret" in Settings.model_fields
    plain = rendered({"auth": {"secret": "n" * 64}})
    assert "ORCHESTRATOR_JWT_PREVIOUS_SECRET" not in api_env(plain)


def test_an_existing_secret_may_hold_a_previous_secret_or_not() -> None:
    chart = rendered({"auth": {"existingSecret": "my-jwt"}})
    ref = api_env(chart)["ORCHESTRATOR_JWT_PREVIOUS_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "my-jwt", "key": "jwt-previous-secret", "optional": True}


def test_a_jwks_url_configures_the_api_and_opens_its_egress() -> None:
    chart = rendered({"auth": {"algorithm": "RS256", "jwksUrl": JWKS}})
    data = settings(chart)
    assert data["ORCHESTRATOR_JWT_JWKS_URL"] == JWKS
    assert data["ORCHESTRATOR_JWT_JWKS_REFRESH_SECONDS"] == "300"
    for name in ("ORCHESTRATOR_JWT_JWKS_URL", "ORCHESTRATOR_JWT_JWKS_REFRESH_SECONDS"):
        assert name.removeprefix(ENV_PREFIX).lower() in Settings.model_fields
    key = api_env(chart)["ORCHESTRATOR_JWT_PUBLIC_KEY"]["valueFrom"]["secretKeyRef"]
    assert key["optional"] is True  # no static key: the provider's are enough
    policy = chart.get("NetworkPolicy", "ao-agent-orchestrator-api")
    assert {"ports": [{"port": 443, "protocol": "TCP"}]} in policy["spec"]["egress"]
    worker = chart.get("NetworkPolicy", "ao-agent-orchestrator-worker")
    assert {"ports": [{"port": 443, "protocol": "TCP"}]} not in worker["spec"]["egress"]


@pytest.mark.parametrize(
    ("auth", "why"),
    [
        ({"jwksUrl": JWKS}, "auth.jwksUrl: a key set holds public keys"),
        ({"algorithm": "RS256"}, "needs auth.publicKey, auth.existingSecret"),
    ],
)
def test_combinations_that_cannot_verify_a_token_are_refused(
    auth: dict[str, Any], why: str
) -> None:
    with pytest.raises(HelmError, match=why):
        render({"auth": {"secret": "s" * 64, **auth}})

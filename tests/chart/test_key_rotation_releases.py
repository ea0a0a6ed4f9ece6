"""The chart's values for token key rotation (auth.previousSecret, existingSecretPreviousKey,
jwksUrl, jwksRefreshSeconds, networkPolicy.jwks) against what the api accepts: each rendered
with the real Helm SDK (tests/chart/conftest.py), and the api pod's environment, resolved from
the rendered ConfigMap and Secret as the kubelet would, given to a real api process."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from tests.chart.conftest import Rendered, parse, render
from tests.e2e.test_jwks import Provider, serving

SECRET = "current-secret-0123456789abcdef-0123456789"
PREVIOUS = "previous-secret-0123456789abcdef-012345678"


def rendered(values: dict[str, Any]) -> Rendered:
    return parse("rotation-release", values, render(values))


def rendered_or_refusal(values: dict[str, Any]) -> Rendered | str:
    """The release, or the render's refusal (a fix may refuse what is shown as a defect)."""
    try:
        return rendered(values)
    except Exception as refused:
        return str(refused)


def api_egress(release: Rendered) -> list[dict[str, Any]]:
    policies = [
        o
        for o in release.of_kind("NetworkPolicy")
        if o["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "api"
    ]
    assert len(policies) == 1
    egress: list[dict[str, Any]] = policies[0]["spec"]["egress"]
    return egress


def api_env(release: Rendered, folder: Path) -> dict[str, str]:
    """The api container's ORCHESTRATOR_* environment as the kubelet builds it: the settings
    ConfigMap (envFrom) and each secretKeyRef read from the rendered Secrets (an optional
    key that is absent leaves its variable unset, as in a pod); the tiers file in `folder`."""
    secrets = {
        o["metadata"]["name"]: {
            key: base64.b64decode(value).decode() for key, value in (o.get("data") or {}).items()
        }
        for o in release.of_kind("Secret")
    }
    env = dict(release.get("ConfigMap", "ao-agent-orchestrator-config")["data"])
    tiers = release.get("ConfigMap", "ao-agent-orchestrator-tiers")["data"]["tiers.json"]
    (folder / "tiers.json").write_text(tiers)
    env["ORCHESTRATOR_TIERS_FILE"] = str(folder / "tiers.json")
    deployment = release.get("Deployment", "ao-agent-orchestrator-api")
    (container,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "api"
    ]
    for entry in container.get("env", []):
        name = entry["name"]
        if not name.startswith("ORCHESTRATOR_") or name in ("ORCHESTRATOR_REDIS_URL",):
            continue
        if "value" in entry:
            env[name] = entry["value"]
            continue
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            continue
        value = secrets.get(ref["name"], {}).get(ref["key"])
        if value is None:
            assert ref.get("optional"), f"{name}: {ref} is not in the rendered Secrets"
            continue
        env[name] = value
    for name in ("ORCHESTRATOR_METRICS_PORT", "ORCHESTRATOR_DATABASE_URL"):
        env.pop(name, None)  # the stack picks free ports; no PostgreSQL here
    return env


@pytest.fixture
def provider() -> Iterator[Provider]:
    with serving("A") as served:
        yield served


def claims() -> dict[str, Any]:
    return {"sub": "u1", "tenant_id": "t1", "exp": int(time.time()) + 600}


def sends(api_url: str, bearer: str) -> int:
    return httpx.post(
        f"{api_url}/api/chat/send",
        json={"message": "hi", "session_id": "s1"},
        headers={"Authorization": f"Bearer {bearer}"},
        timeout=10,
    ).status_code


def test_the_api_egress_reaches_the_port_of_auth_jwks_url() -> None:
    """An in-cluster identity provider (Keycloak's service on 8080, Dex on 5556) is the usual
    case: with auth.jwksUrl on such a port, the api's NetworkPolicy (on by default) still
    allows egress to 443 only, so no read of the set ever connects: the api pods never become
    ready, and nothing at render says why. Expected: the URL's port is allowed (or the render
    refuses a port networkPolicy.jwks.ports lacks)."""
    url = "http://keycloak.auth.svc.cluster.local:8080/realms/chat/protocol/openid-connect/certs"
    release = rendered_or_refusal({"auth": {"algorithm": "RS256", "jwksUrl": url}})
    if isinstance(release, str):  # a render refusing it, naming the port, is a fix too
        assert "8080" in release, release
        return
    ports = {
        (port["port"], port.get("protocol", "TCP"))
        for rule in api_egress(release)
        for port in rule.get("ports", [])
    }
    assert (8080, "TCP") in ports, f"egress of the api pods: {sorted(ports)}"


def test_a_previous_secret_the_api_refuses_is_refused_at_render(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The chart refuses an auth.secret shorter than the algorithm's hash (secrets.yaml: so
    that a rollout does not stall on pods that exit 2), but not an auth.previousSecret that
    short: it renders, and every new api pod exits at start (the api judges the previous
    secret as it judges the current one), the rollout stalls mid-rotation."""
    values = {"auth": {"secret": SECRET, "previousSecret": "old-and-short"}}
    release = rendered_or_refusal(values)
    if isinstance(release, str):
        assert "previousSecret" in release, release
        return
    stack = LocalStack.for_redis(redis_server.url, log_dir=tmp_path)
    stack.env.update(api_env(release, tmp_path))
    try:
        api = stack.start_api()
        code = api.process.wait(timeout=30)
        pytest.fail(
            f"rendered, and the api exits {code}: " + api.output().strip().splitlines()[-1][:300]
        )
    finally:
        stack.stop()


@contextmanager
def serving_release(
    redis_server: RedisServer, tmp_path: Path, env: dict[str, str]
) -> Iterator[Child]:
    """A ready api process with the environment a release gives its pods."""
    stack = LocalStack.for_redis(redis_server.url, log_dir=tmp_path)
    stack.env.update(env)
    stack.env["ORCHESTRATOR_DEFAULT_TIER"] = "enterprise"
    try:
        api = stack.start_api()
        stack.wait_ready(api)
        yield api
    finally:
        stack.stop()


@pytest.mark.parametrize("with_public_key", [False, True], ids=["jwks-only", "jwks+pem"])
def test_a_release_with_auth_jwks_url_serves_the_provider_s_tokens(
    redis_server: RedisServer, tmp_path: Path, provider: Provider, with_public_key: bool
) -> None:
    """Guard: RS256 with auth.jwksUrl, with or without a PEM key beside it, renders an
    environment the api starts with (the optional public key absent or empty), becomes ready
    once it read the provider's set, and takes the provider's tokens and the PEM key's."""
    pem_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    auth: dict[str, Any] = {
        "algorithm": "RS256",
        "jwksUrl": provider.url,
        "jwksRefreshSeconds": 30,
    }
    if with_public_key:
        auth["publicKey"] = (
            pem_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
    release = rendered({"auth": auth})
    env = api_env(release, tmp_path)
    assert env["ORCHESTRATOR_JWT_JWKS_URL"] == provider.url
    assert env["ORCHESTRATOR_JWT_JWKS_REFRESH_SECONDS"] == "30"
    with serving_release(redis_server, tmp_path, env) as api:
        assert sends(api.url, provider.token("t1", "A")) == 202
        if with_public_key:
            assert sends(api.url, jwt.encode(claims(), pem_key, algorithm="RS256")) == 202


def test_a_release_with_auth_previous_secret_takes_both_secrets(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Guard: HS256 with auth.previousSecret renders both variables; the api takes tokens
    signed with either secret and refuses others."""
    release = rendered({"auth": {"secret": SECRET, "previousSecret": PREVIOUS}})
    env = api_env(release, tmp_path)
    assert env["ORCHESTRATOR_JWT_PREVIOUS_SECRET"] == PREVIOUS
    with serving_release(redis_server, tmp_path, env) as api:
        for secret, status in ((SECRET, 202), (PREVIOUS, 202), ("x" * 40, 401)):
            assert sends(api.url, jwt.encode(claims(), secret, algorithm="HS256")) == status


@pytest.mark.parametrize(
    ("auth", "refusal"),
    [
        ({"algorithm": "HS256", "jwksUrl": "https://idp.example/jwks"}, "auth.jwksUrl"),
        ({"algorithm": "RS256", "jwksUrl": "ftp://idp.example/jwks"}, "jwksUrl"),
        ({"algorithm": "RS256", "jwksUrl": "https://i/j", "jwksRefreshSeconds": 10}, "jwksRefresh"),
        ({"existingSecret": "mine", "existingSecretPreviousKey": ""}, "existingSecretPreviousKey"),
    ],
)
def test_the_chart_refuses_what_the_api_would(auth: dict[str, Any], refusal: str) -> None:
    """Guard: values the api would refuse at start are refused at render."""
    with pytest.raises(Exception, match=refusal):
        render({"auth": auth})

"""Contract checks (DESIGN.md / README.md) against the real processes."""

from __future__ import annotations

import socket

import httpx
import pytest

from services.cli.embedded import RedisServer
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import Deployment, deploy

pytestmark = pytest.mark.e2e


async def test_empty_send_body_is_400_malformed_json(deployment: Deployment) -> None:
    """README, Errors: `400 | malformed_json`; DESIGN §9: malformed JSON gets a clear error.
    A body of zero bytes is not JSON (a blank one of spaces already gets 400 malformed_json)."""
    tenant = unique("t")
    async with httpx.AsyncClient(base_url=deployment.api.url, timeout=10) as http:
        reply = await http.post(
            "/api/chat/send",
            content=b"",
            headers={**auth(tenant), "Content-Type": "application/json"},
        )
    body = reply.json()
    assert (reply.status_code, body["error"]["code"]) == (400, "malformed_json"), reply.text


async def test_empty_status_body_is_400_malformed_json(deployment: Deployment) -> None:
    tenant = unique("t")
    async with httpx.AsyncClient(base_url=deployment.api.url, timeout=10) as http:
        reply = await http.post(
            "/api/chat/status",
            content=b"",
            headers={**auth(tenant), "Content-Type": "application/json"},
        )
    body = reply.json()
    assert (reply.status_code, body["error"]["code"]) == (400, "malformed_json"), reply.text


async def test_openapi_names_the_unknown_tenant_code_the_api_answers(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """README: the OpenAPI document lists for POST /api/chat/send "every refusal with its
    error body"; README's error table: 403 `unknown_tenant`. The document says `forbidden`."""
    with deploy(e2e_redis, tmp_path_factory.mktemp("logs"), require_known_tenant="true") as dep:
        async with httpx.AsyncClient(base_url=dep.api.url, timeout=10) as http:
            refused = await http.post(
                "/api/chat/send", json={"message": "hi"}, headers=auth(unique("unknown"))
            )
            doc = (await http.get("/schema/openapi.json")).json()
    assert refused.status_code == 403
    code = refused.json()["error"]["code"]
    assert code == "unknown_tenant"
    described = doc["paths"]["/api/chat/send"]["post"]["responses"]["403"]["description"]
    assert "unknown tenant (`forbidden`)" not in described, described
    assert f"`{code}`" in described, described


async def test_api_pod_name_defaults_to_hostname_pid(deployment: Deployment) -> None:
    """README, Configuration: `POD_NAME` | default `hostname-pid` | consumer and pod name.
    The api reports its pod name in /ws/stats and /health/detailed."""
    expected = f"{socket.gethostname()}-{deployment.api.process.pid}"
    async with httpx.AsyncClient(base_url=deployment.api.url, timeout=10) as http:
        stats = (await http.get("/ws/stats", headers=auth(unique("t")))).json()
        detailed = (await http.get("/health/detailed")).json()
    assert stats["pod"] == expected, stats
    assert detailed["components"]["pod"] == expected, detailed

"""Tokens of an identity provider, verified with the keys the api reads from its `jwks_uri`
(`ORCHESTRATOR_JWT_JWKS_URL`): a real api process and a real HTTP server on loopback standing
for the provider, which rotates its keys, goes down, and is asked for a key it never had."""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from services.cli.embedded import RedisServer, free_port
from services.cli.stack import Child
from services.core.jwks import MIN_REFRESH_SECONDS
from tests.e2e.clients import connect, unique
from tests.e2e.conftest import lone_api, new_stack

pytestmark = pytest.mark.e2e


class Provider:
    """An identity provider's key set endpoint: serves the public halves of `keys` by kid,
    counts the reads, and can be made to fail or to redirect; over TLS with `tls`."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.reads = 0
        self.failing = False
        self.body: bytes | None = None  # served instead of the set when set
        self.redirect_to: str | None = None  # answered with a 302 to it when set
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.reads += 1
                if provider.failing:
                    self.send_error(502)
                    return
                if provider.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", provider.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = provider.body or json.dumps({"keys": provider.public_keys()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "http" if tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def public_keys(self) -> list[dict[str, Any]]:
        to_jwk = jwt.get_algorithm_by_name("RS256").to_jwk
        return [
            {**json.loads(to_jwk(key.public_key())), "kid": kid, "use": "sig", "alg": "RS256"}
            for kid, key in self.keys.items()
        ]

    def token(self, tenant: str, kid: str, key: rsa.RSAPrivateKey | None = None) -> str:
        claims = {"sub": "u1", "tenant_id": tenant, "exp": int(time.time()) + 600}
        return jwt.encode(claims, key or self.keys[kid], algorithm="RS256", headers={"kid": kid})


@contextmanager
def serving(*kids: str, tls: ssl.SSLContext | None = None) -> Iterator[Provider]:
    """A provider with a key for each of `kids`, shut down at the end."""
    served = Provider(tls)
    for kid in kids:
        served.add(kid)
    try:
        yield served
    finally:
        served.server.shutdown()
        served.server.server_close()


@pytest.fixture
def provider() -> Iterator[Provider]:
    with serving("2026-11") as served:
        yield served


def provider_api(redis: RedisServer, tmp_path: Path, provider: Provider) -> Any:
    return lone_api(redis, tmp_path / "logs", jwt_algorithm="RS256", jwt_jwks_url=provider.url)


@contextmanager
def unready_api(redis: RedisServer, tmp_path: Path, provider: Provider) -> Iterator[Child]:
    """An api that cannot become ready (no key read): started, waited for until it serves."""
    stack = new_stack(redis, tmp_path / "logs", jwt_algorithm="RS256", jwt_jwks_url=provider.url)
    try:
        api = stack.start_api()
        deadline = time.monotonic() + 30
        while True:
            stack.check_alive()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{api.url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, api.output()
            time.sleep(0.05)
        yield api
    finally:
        stack.stop()


def send(api: Child, bearer: str, tenant: str) -> httpx.Response:
    return httpx.post(
        f"{api.url}/api/chat/send",
        json={"message": "hi", "session_id": unique("s")},
        headers={"Authorization": f"Bearer {bearer}"},
        timeout=10,
    )


def until_not_503(api: Child, bearer: str, tenant: str, within: float = 10) -> httpx.Response:
    """What a client following `Retry-After` ends up with."""
    deadline = time.monotonic() + within
    while (reply := send(api, bearer, tenant)).status_code == 503:
        assert reply.headers.get("Retry-After"), reply.headers
        assert time.monotonic() < deadline, reply.text
        time.sleep(float(reply.headers["Retry-After"]) / 4)
    return reply


async def test_a_key_the_provider_adds_verifies_after_one_retry(
    e2e_redis: RedisServer, tmp_path: Path, provider: Provider
) -> None:
    """The provider rotates: its new key's tokens get a 503 to retry while the api reads the
    set again, then verify over REST and on a socket; the old key's still do."""
    tenant = unique("t")
    with provider_api(e2e_redis, tmp_path, provider) as api:
        assert send(api, provider.token(tenant, "2026-11"), tenant).status_code == 202
        provider.add("2026-12")
        fresh = provider.token(tenant, "2026-12")
        first = send(api, fresh, tenant)
        assert first.status_code == 503, first.text
        assert first.json()["error"]["code"] == "unavailable"
        assert until_not_503(api, fresh, tenant, MIN_REFRESH_SECONDS + 10).status_code == 202
        ws, ack = await connect(api.ws_url, tenant, unique("s"), bearer=fresh)
        await ws.close()
        assert ack["data"]["tenant_id"] == tenant
        assert send(api, provider.token(tenant, "2026-11"), tenant).status_code == 202


async def test_made_up_key_ids_do_not_make_the_api_hammer_the_provider(
    e2e_redis: RedisServer, tmp_path: Path, provider: Provider
) -> None:
    """Tokens naming `kid`s the provider never had: 503 to retry until one read of the set
    begun after they came, then 401 (forged, not a retry); many such ids cost one read."""
    tenant = unique("t")
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = [provider.token(tenant, f"made-up-{n}", stranger) for n in range(10)]
    with provider_api(e2e_redis, tmp_path, provider) as api:
        reads = provider.reads
        for bearer in forged:
            assert send(api, bearer, tenant).status_code == 503
        refused = until_not_503(api, forged[0], tenant, within=MIN_REFRESH_SECONDS + 10)
        assert refused.status_code == 401, refused.text
        assert "no configured key has the token's kid" in refused.json()["error"]["message"]
        for bearer in forged:
            assert send(api, bearer, tenant).status_code == 401
        assert provider.reads == reads + 1
        # a known kid with another key's signature is a 401 at once, and no read
        wrong = send(api, provider.token(tenant, "2026-11", stranger), tenant)
        assert wrong.status_code == 401
        assert provider.reads == reads + 1


async def test_a_provider_down_at_start_keeps_the_pod_unready_until_it_answers(
    e2e_redis: RedisServer, tmp_path: Path, provider: Provider
) -> None:
    """No key read: not ready, and a token is a 503 to retry, not a 401 (a client told 401
    signs its user out). Once the provider answers, the pod becomes ready on its own."""
    tenant = unique("t")
    provider.failing = True
    with unready_api(e2e_redis, tmp_path, provider) as api:
        ready = httpx.get(f"{api.url}/health/ready", timeout=10)
        assert ready.status_code == 503, ready.text
        assert "signing keys" in ready.json()["error"]["message"]
        token = provider.token(tenant, "2026-11")
        waiting = send(api, token, tenant)
        assert waiting.status_code == 503, waiting.text
        provider.failing = False
        assert until_not_503(api, token, tenant, within=20).status_code == 202
        assert httpx.get(f"{api.url}/health/ready", timeout=10).status_code == 200

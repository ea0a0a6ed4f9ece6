"""Faults around the identity provider's key set (services/core/jwks.py) and of the verifier
that uses it (services/core/auth.py), each shown against a real HTTP server on loopback that
stands for the provider (tests/e2e/test_jwks.py's `Provider`, and a server of our own that
answers slowly). Time is the real one except where a test passes `KeySetSource` a clock of
its own, which is what its `clock` argument is for: then no test waits the 10 s between reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric import rsa

from services.cli.embedded import RedisServer, free_port
from services.core.auth import TokenVerifier
from services.core.errors import Unauthorized, Unavailable
from services.core.jwks import FETCH_TIMEOUT_SECONDS, MIN_REFRESH_SECONDS, KeySetSource
from services.core.jwt_keys import MAX_KEYS, candidates
from services.core.settings import load_settings
from tests.e2e.conftest import lone_api
from tests.e2e.test_jwks import Provider, serving

pytestmark = pytest.mark.e2e


@pytest.fixture
def provider() -> Iterator[Provider]:
    with serving("A") as served:
        yield served


class Dripping:
    """A provider that sends its headers and then one byte of the body per `interval`,
    never the whole of it, until `release()` (then it closes the connection). Each byte comes
    well within urllib's 5 s socket timeout, which bounds each recv, not the read."""

    def __init__(self, interval: float = 0.5) -> None:
        self.released = threading.Event()
        self.requests = 0
        dripping = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                dripping.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                with contextlib.suppress(OSError):
                    while not dripping.released.wait(interval):
                        self.wfile.write(b" ")
                        self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dripping() -> Iterator[Dripping]:
    served = Dripping()
    yield served
    served.release()


class Clock:
    """A monotonic clock the test moves forward (KeySetSource's `clock`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rs256_settings(url: str) -> Any:
    return load_settings(jwt_algorithm="RS256", jwt_jwks_url=url)


def token(key: rsa.RSAPrivateKey, kid: str, *, ttl: int = 600) -> str:
    claims = {"sub": "u1", "tenant_id": "t1", "exp": int(time.time()) + ttl}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


async def test_a_read_of_the_set_ends_within_its_timeout_when_the_provider_drips(
    dripping: Dripping,
) -> None:
    """A provider (or a proxy in front of it) that sends a byte now and then never ends a
    read: urllib's timeout bounds each recv, not the read. `_refresh_now` hands every later
    caller (the periodic refresh, the reads chased for an unknown kid) that same task, so the
    api never reads the set again: unready forever if it had no key yet, every new kid a 503
    forever otherwise. Expected: the read fails after about FETCH_TIMEOUT_SECONDS."""
    source = KeySetSource(dripping.url, "RS256", 300)
    read = source._refresh_now()
    try:
        done, _ = await asyncio.wait({read}, timeout=FETCH_TIMEOUT_SECONDS + 3)
        assert read in done, "the read of a dripping provider is still running"
    finally:
        dripping.release()  # the thread's read ends (the connection closes)
        await read


async def test_a_key_id_once_missing_is_read_again_once_the_provider_may_have_added_it(
    provider: Provider,
) -> None:
    """A token naming kid B comes before the provider serves B (a provider whose signers
    get the new key before its jwks_uri does, a cached jwks_uri): one read lacks B and the
    token is a 401, as designed. But B stays remembered as first asked for then: once the
    provider serves B, every token of it is still a 401 with no read at all, for up to
    ORCHESTRATOR_JWT_JWKS_REFRESH_SECONDS (300 s), and every client of the new key is signed
    out, though a read would be allowed (MIN_REFRESH_SECONDS passed long ago)."""
    clock = Clock()
    verifier = TokenVerifier(rs256_settings(provider.url))
    source = KeySetSource(provider.url, "RS256", 300, clock=clock)
    verifier.source = source
    await verifier.start()
    try:
        b_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        clock.now += MIN_REFRESH_SECONDS * 2
        with pytest.raises(Unavailable):  # B unknown: a read is chased
            verifier.verify(token(b_key, "B"))
        assert source._chasing is not None
        await source._chasing  # the read lacks B: the token is refused
        with pytest.raises(Unauthorized):
            verifier.verify(token(b_key, "B"))
        provider.keys["B"] = b_key  # the provider publishes B
        reads = provider.reads
        clock.now += MIN_REFRESH_SECONDS * 6  # a minute later: a read is allowed again
        fresh = token(b_key, "B", ttl=601)
        try:
            verifier.verify(fresh)
        except Unavailable:  # expected: a read, then the token verifies
            assert source._chasing is not None
            await source._chasing
            assert verifier.verify(fresh).user_id == "u1"
        except Unauthorized as refused:
            pytest.fail(
                f"a token of the provider's published key B is a 401 ({refused.message}) "
                f"and no read was made ({provider.reads - reads} reads)"
            )
    finally:
        await verifier.stop()


async def test_a_token_of_a_key_the_provider_removed_is_refused_after_the_next_read(
    provider: Provider,
) -> None:
    """A provider removes a key (the usual answer to its compromise). A token verified with
    it before stays in the verifier's cache until its own `exp`, which whoever holds the key
    chose: a forged token with a ten-year `exp` used once is accepted by that pod for ten
    years (or until the LRU drops it), whatever the provider's set says. Expected: refused
    once a read of the set no longer holds its key."""
    verifier = TokenVerifier(rs256_settings(provider.url))
    await verifier.start()
    try:
        forged = token(provider.keys["A"], "A", ttl=10 * 365 * 86400)
        assert verifier.verify(forged).user_id == "u1"
        del provider.keys["A"]
        provider.add("B")
        assert verifier.source is not None
        await verifier.source._refresh_now()
        assert not verifier.source.knows("A")
        with pytest.raises((Unauthorized, Unavailable)):
            verifier.verify(forged)
    finally:
        await verifier.stop()


async def test_the_provider_set_is_bounded_like_a_configured_one(provider: Provider) -> None:
    """MAX_KEYS bounds the keys a configured set may hold because "a token that no key
    verifies costs one signature check per candidate key" (jwt_keys.py); the provider's set
    has no bound. A set of many keys without `kid` (or one kid repeated) makes every forged
    token without a matching kid cost that many RSA checks on the event loop: about 0.3 s
    per request for the ~2400 keys a 1 MiB document holds, blocking every other request."""
    one = provider.public_keys()[0]
    del one["kid"]
    provider.body = json.dumps({"keys": [one] * 200}).encode()
    source = KeySetSource(provider.url, "RS256", 300)
    await source.start()
    try:
        assert source.loaded
        tried = candidates(source.keys, {"alg": "RS256"})
        assert len(tried) <= MAX_KEYS, f"a forged token is checked against {len(tried)} keys"
    finally:
        await source.stop()


async def test_a_socket_with_a_kid_not_read_yet_is_told_to_try_again(
    redis_server: RedisServer, tmp_path: Path, provider: Provider
) -> None:
    """Guard: on a socket, a token naming a kid the provider may just have added is closed
    1013 (try again: the browser does not sign its user out), not 1008; the REST answer to
    the same token at the same moment is a 503 with an integer Retry-After of at least 1."""
    with lone_api(
        redis_server, tmp_path / "logs", jwt_algorithm="RS256", jwt_jwks_url=provider.url
    ) as api:
        provider.add("B")
        bearer = provider.token("t1", "B")
        url = f"{api.ws_url}/ws/t1/s1"
        protocols = ["orchestrator.v1", f"bearer.{bearer}"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with websockets.connect(
                url,
                subprotocols=protocols,  # type: ignore[arg-type]
                open_timeout=10,
            ) as ws:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1013, closed.value.rcvd
        reply = httpx.post(
            f"{api.url}/api/chat/send",
            json={"message": "hi", "session_id": "s1"},
            headers={"Authorization": f"Bearer {bearer}"},
            timeout=10,
        )
        assert reply.status_code == 503, reply.text
        assert int(reply.headers["Retry-After"]) >= 1


async def test_the_warning_for_a_document_not_json_says_what_the_provider_sent(
    provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy's or a login page's HTML answered 200 at the jwks_uri: the warning an operator
    reads says the document "starts with '{' but is not a JSON Web Key Set" (key_set's words
    for a configured value that starts with '{'), which it does not: misleading in the one
    line that explains why the pods are not ready."""
    provider.body = b"<html><body>Sign in</body></html>"
    source = KeySetSource(provider.url, "RS256", 300)
    with caplog.at_level("WARNING", logger="services.core.jwks"):
        await source._refresh_now()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "services.core.jwks"]
    assert "starts with '{'" not in warning, warning

"""The identity provider's key set as the api keeps it (services/core/jwks.py), read from a
real HTTP server on loopback; the clock is the test's, so MIN_REFRESH_SECONDS needs no wait."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from services.core.jwks import MAX_DOCUMENT_BYTES, MIN_REFRESH_SECONDS, KeySetSource
from tests.e2e.test_jwks import Provider, serving
from tests.persistence.test_database_url import _certificate, _key, _write
from tests.unit.test_key_rotation import jwk


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def provider() -> Iterator[Provider]:
    with serving("k1") as served:
        yield served


async def read_for(source: KeySetSource, kid: str) -> float | None:
    """What `wait_for` answers once the read it scheduled has run."""
    wait = source.wait_for(kid)
    if wait is not None and source._chasing is not None:
        await source._chasing
    return source.wait_for(kid)


async def test_a_failed_read_keeps_the_keys_read_before(provider: Provider) -> None:
    source = KeySetSource(provider.url, "RS256", 300, clock=Clock())
    await source.start()
    try:
        assert source.knows("k1")
        provider.failing = True
        await source._refresh_now()
        assert source.knows("k1"), "a provider's outage must not drop the keys"
        provider.failing = False
        provider.add("k2")
        await source._refresh_now()
        assert source.knows("k2")
        assert source.knows("k1")
    finally:
        await source.stop()


async def test_a_weak_key_the_provider_adds_is_left_out_not_the_whole_set(
    provider: Provider,
) -> None:
    """A strict set would refuse every token until the provider fixed its set."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    keys = [*provider.public_keys(), jwk(weak, kid="weak", alg="RS256")]
    provider.body = json.dumps({"keys": keys}).encode()
    source = KeySetSource(provider.url, "RS256", 300, clock=Clock())
    await source.start()
    try:
        assert source.knows("k1")
        assert not source.knows("weak")
    finally:
        await source.stop()


async def test_an_oversized_document_is_not_read(provider: Provider) -> None:
    provider.body = b'{"keys": [' + b" " * MAX_DOCUMENT_BYTES + b"]}"
    source = KeySetSource(provider.url, "RS256", 300, clock=Clock())
    await source.start()
    try:
        assert not source.loaded
    finally:
        await source.stop()


async def test_an_id_no_read_brought_is_refused_after_one_read(provider: Provider) -> None:
    clock = Clock()
    source = KeySetSource(provider.url, "RS256", 300, clock=clock)
    await source.start()
    try:
        reads = provider.reads
        clock.now += MIN_REFRESH_SECONDS
        assert await read_for(source, "made-up") is None
        assert await read_for(source, "made-up") is None
        assert provider.reads == reads + 1
    finally:
        await source.stop()


# --- redirects: followed while they keep to https ------------------------------------------


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context for 127.0.0.1 whose CA this process trusts (as the api trusts a
    provider's public CA): urllib's default context reads SSL_CERT_FILE."""
    ca_key, server_key = _key(), _key()
    ca = _certificate("test CA", ca_key)
    server = _certificate("127.0.0.1", server_key, ("test CA", ca_key), server=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(_write(tmp_path / "ca.pem", ca)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(_write(tmp_path / "server.pem", server, server_key))
    return context


async def loaded_through(url: str) -> KeySetSource:
    source = KeySetSource(url, "RS256", 300, clock=Clock())
    await source.start()
    await source.stop()
    return source


async def test_a_set_moved_by_a_redirect_is_read(provider: Provider) -> None:
    with serving() as moved:
        moved.redirect_to = provider.url
        source = await loaded_through(moved.url)
    assert source.knows("k1")


async def test_an_https_set_is_read_and_followed_to_https(
    provider: Provider, tls: ssl.SSLContext
) -> None:
    with serving("k2", tls=tls) as secure, serving(tls=tls) as moved:
        assert (await loaded_through(secure.url)).knows("k2")
        moved.redirect_to = secure.url
        assert (await loaded_through(moved.url)).knows("k2")


async def test_a_redirect_from_https_to_http_is_refused(
    provider: Provider, tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """A set read in the clear can be swapped on the way: whoever swaps it signs tokens."""
    with serving(tls=tls) as moved, caplog.at_level(logging.WARNING, "services.core.jwks"):
        moved.redirect_to = provider.url
        source = await loaded_through(moved.url)
    assert not source.loaded
    assert provider.reads == 0, "the http set was read"
    assert "a redirect to http:// is refused (only https is followed)" in caplog.text


async def test_a_redirect_to_ftp_is_refused(
    provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "services.core.jwks"):
        provider.redirect_to = "ftp://127.0.0.1:1/jwks.json"
        source = await loaded_through(provider.url)
    assert not source.loaded
    assert "a redirect to ftp:// is refused (only https or http is followed)" in caplog.text

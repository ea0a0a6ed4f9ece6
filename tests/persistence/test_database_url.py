"""ORCHESTRATOR_DATABASE_URL as a managed database gives it: libpq parameters after `?`.

Each accepted parameter must take effect on the real connection (seen from the server's side:
`current_setting`, `pg_stat_ssl`), and one that cannot be honoured must stop the engine from
being built, with one line naming the variable, instead of failing every connection later.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.cli.embedded_postgres import PostgresServer
from services.core.settings import ConfigError, load_settings
from services.persistence.database import asyncpg_target, create_engine, create_oneshot_engine

VARIABLE = "ORCHESTRATOR_DATABASE_URL"


async def _server_side(url: str, query: str) -> Any:
    """`query`'s one value, on a connection the service's own pool opened for `url`."""
    engine = create_engine(load_settings(database_url=url))
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(query))).scalar_one()
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("parameters", "query", "expected"),
    [
        ("connect_timeout=10", "SELECT 1", 1),
        ("application_name=chat-api", "SELECT current_setting('application_name')", "chat-api"),
        (
            "fallback_application_name=chat-api",
            "SELECT current_setting('application_name')",
            "chat-api",
        ),
        ("connect_timeout=3", "SELECT current_setting('application_name')", "agent-orchestrator"),
        (
            "options=" + quote("-c statement_timeout=1234 -c search_path=public"),
            "SELECT current_setting('statement_timeout') || ' ' || current_setting('search_path')",
            "1234ms public",
        ),
        ("target_session_attrs=read-write", "SELECT pg_is_in_recovery()", False),
        ("sslmode=prefer&channel_binding=prefer&gssencmode=prefer", "SELECT 1", 1),
        ("sslmode=disable&sslsni=1&client_encoding=UTF8", "SELECT 1", 1),
        ("prepared_statement_cache_size=0&sslcompression=0", "SELECT 1", 1),
        ("ssl=disable&application_name=", "SELECT 1", 1),
    ],
)
async def test_a_libpq_parameter_takes_effect(
    database_url: str, parameters: str, query: str, expected: object
) -> None:
    assert await _server_side(f"{database_url}?{parameters}", query) == expected


def test_connect_timeout_in_the_url_replaces_the_setting() -> None:
    target = asyncpg_target("postgresql://u@db.example/app?connect_timeout=10")
    assert target.connect_args(timeout=5.0)["timeout"] == 10.0
    assert (
        asyncpg_target("postgresql://u@db.example/app").connect_args(timeout=5.0)["timeout"] == 5.0
    )


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ("keepalives_idle=30", "keepalives_idle"),
        ("pgbouncer=true", "pgbouncer"),
        ("channel_binding=require", "channel_binding"),
        ("gssencmode=require", "gssencmode"),
        ("sslmode=bogus", "sslmode"),
        ("target_session_attrs=primary-please", "target_session_attrs"),
        ("sslrootcert=/nonexistent/root.crt&sslmode=verify-full", "sslrootcert"),
        ("sslcert=/nonexistent/client.crt", "sslcert"),
        ("connect_timeout=0", "connect_timeout"),
        ("connect_timeout=soon", "connect_timeout"),
        ("ssl_min_protocol_version=SSLv3", "ssl_min_protocol_version"),
        ("sslrootcert=system&sslmode=require", "sslrootcert=system"),
        ("client_encoding=LATIN1", "client_encoding"),
        ("prepared_statement_cache_size=-1", "prepared_statement_cache_size"),
    ],
)
def test_a_parameter_that_cannot_be_honoured_is_refused_at_start(
    parameters: str, named: str
) -> None:
    url = f"postgresql://app:secret-pw@db.example:5432/app?{parameters}"
    builders: list[Callable[[], AsyncEngine]] = [
        lambda: create_engine(load_settings(database_url=url)),  # api, writer, prune
        lambda: create_oneshot_engine(url),  # migrate
    ]
    for build in builders:
        with pytest.raises(ConfigError) as refused:
            build()
        message = str(refused.value)
        assert message.startswith(f"{VARIABLE}: "), message
        assert named in message, message
        assert "\n" not in message, message
        assert "secret-pw" not in message, message


# --- TLS: the ssl files in the URL reach the handshake -------------------------------------


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    client_cert: Path
    client_key: Path
    server: Path  # certificate and key of 127.0.0.1, signed by `ca`


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    *,
    server: bool = False,
) -> x509.Certificate:
    """A CA (no `issuer`), or a leaf signed by `issuer`; a server leaf names 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
    )
    if server:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, *items: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    chunks = [
        item.public_bytes(serialization.Encoding.PEM)
        if isinstance(item, x509.Certificate)
        else item.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for item in items
    ]
    path.write_bytes(b"".join(chunks))
    path.chmod(0o600)
    return path


SSL_REQUEST = struct.pack("!ii", 8, 80877103)


@dataclass
class TlsFront:
    """A TLS endpoint in front of the (TLS-less) embedded PostgreSQL: it answers the SSLRequest
    as a server with a certificate does, then relays the decrypted stream. It records the
    client certificate of each handshake, or None when the client presented none."""

    pki: Pki
    context: ssl.SSLContext
    upstream_port: int
    port: int = 0
    handshakes: list[str | None] = field(default_factory=list)

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if await reader.readexactly(8) != SSL_REQUEST:
                return
            writer.write(b"S")
            await writer.drain()
            await writer.start_tls(self.context)
            peer = writer.get_extra_info("peercert")
            self.handshakes.append(
                dict(item[0] for item in peer["subject"])["commonName"] if peer else None
            )
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port
            )
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # a client that refused the certificate hangs up mid-handshake
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    files = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key, client_key = _key(), _key(), _key(), _key()
    ca = _certificate("test-ca", ca_key)
    server_cert = _certificate("127.0.0.1", server_key, ("test-ca", ca_key), server=True)
    return Pki(
        ca=_write(files / "root.crt", ca),
        other_ca=_write(files / "other.crt", _certificate("other-ca", other_key)),
        client_cert=_write(
            files / "client.crt", _certificate("orchestrator", client_key, ("test-ca", ca_key))
        ),
        client_key=_write(files / "client.key", client_key),
        server=_write(files / "server.pem", server_cert, server_key),
    )


@pytest.fixture
async def tls_front(pki: Pki, postgres_server: PostgresServer) -> AsyncIterator[TlsFront]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server)
    context.load_verify_locations(cafile=pki.ca)
    context.verify_mode = ssl.CERT_OPTIONAL  # ask for a client certificate, as ssl_ca_file does
    front = TlsFront(pki, context, postgres_server.port)
    listener = await asyncio.start_server(front.relay, "127.0.0.1", 0)
    front.port = listener.sockets[0].getsockname()[1]
    try:
        yield front
    finally:
        listener.close()


def _through(front: TlsFront, database_url: str) -> str:
    """`database_url` with the TLS front's port instead of PostgreSQL's."""
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{front.port}"))


async def test_sslrootcert_verifies_the_server(tls_front: TlsFront, database_url: str) -> None:
    url = f"{_through(tls_front, database_url)}?sslmode=verify-full&sslrootcert={tls_front.pki.ca}"
    assert await _server_side(url, "SELECT 1") == 1
    assert tls_front.handshakes == [None]


async def test_sslcert_and_sslkey_are_presented(tls_front: TlsFront, database_url: str) -> None:
    pki = tls_front.pki
    url = (
        f"{_through(tls_front, database_url)}?sslmode=verify-ca&sslrootcert={pki.ca}"
        f"&sslcert={pki.client_cert}&sslkey={pki.client_key}&connect_timeout=10"
    )
    assert await _server_side(url, "SELECT 1") == 1
    assert tls_front.handshakes == ["orchestrator"]


@pytest.mark.parametrize("trust", ["other", "system"])
async def test_a_server_the_root_does_not_vouch_for_is_not_trusted(
    tls_front: TlsFront, database_url: str, trust: str
) -> None:
    """Not a silent fallback to an unverified (or plain) connection."""
    root = tls_front.pki.other_ca if trust == "other" else "system"
    url = f"{_through(tls_front, database_url)}?sslmode=verify-full&sslrootcert={root}"
    with pytest.raises(ssl.SSLCertVerificationError):
        await _server_side(url, "SELECT 1")

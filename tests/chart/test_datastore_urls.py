"""The in-chart Redis/PostgreSQL URLs work with any password the schema accepts.

The chart writes `redis.password` / `postgresql.password` into the `redis-url` / `database-url`
of the datastores' Secrets, which every pod uses as it is. A base64 password (`openssl rand
-base64`, the form docs/kubernetes.md uses for secrets) holds '/', '+' and '=': unencoded, '/'
ends the authority and the URL names no port. Each runtime test renders the chart, points the
URL's host at a real local server started with that password (the Service name resolves only in
a cluster) and connects with the product's own client code.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import asyncpg
import pytest
import redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.core.redis_client import create_redis
from services.core.settings import Settings
from services.persistence.migrate import migrate
from tests.chart.conftest import parse, render

# What `openssl rand -base64 14` prints, give or take, plus a space (Go's QueryEscape writes
# it as '+', which a URL parser reads back as a literal '+').
PASSWORD = "Qm9v/YmFy+cXV4 ZW5k="


def _secret_url(component: str, password: str) -> tuple[str, str]:
    """(decoded URL of the Secret `ao-agent-orchestrator-<component>`, its Service host)."""
    name = f"ao-agent-orchestrator-{component}"
    values = {component: {"password": password}}
    secret = parse("urls", values, render(values)).get("Secret", name)
    key = "redis-url" if component == "redis" else "database-url"
    return base64.b64decode(secret["data"][key]).decode(), name


@pytest.mark.parametrize("component", ["redis", "postgresql"])
@pytest.mark.parametrize("password", [PASSWORD, "a:b@c/d?e#f%g+h i&j=k~l"])
def test_the_url_carries_the_password_verbatim(component: str, password: str) -> None:
    """Every URL parser (urllib, redis-py, asyncpg) reads back exactly the configured password."""
    url, host = _secret_url(component, password)
    parts = urlsplit(url)
    assert (parts.hostname, unquote(parts.password or "")) == (host, password), url


@pytest.fixture
def valkey() -> Iterator[RedisServer]:
    server = RedisServer().start()  # its start-up check pings without a password
    redis.Redis.from_url(server.url).config_set("requirepass", PASSWORD)
    yield server
    server.cleanup()


async def test_in_chart_redis_url_works_with_a_base64_password(valkey: RedisServer) -> None:
    url, host = _secret_url("redis", PASSWORD)
    local = url.replace(f"@{host}:6379/", f"@127.0.0.1:{valkey.port}/")
    assert local != url, url
    client = create_redis(Settings(redis_url=local), retries=0)
    try:
        assert await asyncio.wait_for(client.ping(), 10) is True
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(durable=False).start()
    yield server
    server.cleanup()


async def test_in_chart_postgresql_url_works_with_a_base64_password(
    postgres: PostgresServer,
) -> None:
    conn = await asyncpg.connect(postgres.url())
    try:
        await conn.execute(f"CREATE ROLE orchestrator LOGIN PASSWORD '{PASSWORD}'")
        await conn.execute("CREATE DATABASE orchestrator OWNER orchestrator")
    finally:
        await conn.close()
    url, host = _secret_url("postgresql", PASSWORD)
    local = url.replace(f"@{host}:5432/", f"@127.0.0.1:{postgres.port}/")
    assert local != url, url
    await asyncio.wait_for(migrate(local), 30)  # what the migration Job runs

"""The migrations hook Job and the prune CronJob as their pods run them: the rendered env
(the settings ConfigMap, then `env`, each secretKeyRef read from the Secrets docs/kubernetes.md
has the platform team create) given to the real `orchestrator` CLI against a real PostgreSQL.

Both read the services' settings ConfigMap, so everything it says about Redis reaches them,
though neither talks to Redis and the chart gives them no Redis Secret.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from services.cli.embedded_postgres import SUPERUSER, PostgresServer
from tests.chart.conftest import Rendered, parse, render
from tests.chart.pods import container_of, process_env, run

JWT = "j" * 64


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(durable=False).start()
    try:
        yield server
    finally:
        server.cleanup()


def _production(mode: str) -> dict[str, Any]:
    """The documented production minimum ("Install / Production"), on Redis of `mode`."""
    external_redis: dict[str, Any] = {"existingSecret": "orchestrator-redis", "mode": mode}
    if mode == "sentinel":
        external_redis = {"mode": mode, "sentinels": ["sentinel-0.data.svc:26379"]}
    return {
        "redis": {"enabled": False},
        "externalRedis": external_redis,
        "postgresql": {"enabled": False},
        "externalDatabase": {"existingSecret": "orchestrator-database"},
        "auth": {"existingSecret": "orchestrator-jwt"},
    }


@pytest.mark.parametrize("mode", ["standalone", "sentinel", "cluster"])
def test_migrations_and_the_nightly_prune_run_whatever_the_redis_mode(
    mode: str, postgres: PostgresServer, tmp_path: Path
) -> None:
    """With `externalRedis.mode=cluster` every prune used to exit 2 before reaching
    PostgreSQL ("ORCHESTRATOR_REDIS_URL (a seed node) is required"), so history grew without
    bound; the topology's addresses are now required where a Redis client is built."""
    values = _production(mode)
    rendered = parse(mode, values, render(values))
    secrets = {
        ("orchestrator-database", "database-url"): postgres.url(),
        ("orchestrator-redis", "redis-url"): "redis://redis.data.svc:6379/0",
        ("orchestrator-jwt", "jwt-secret"): JWT,
    }
    (job,) = rendered.of_kind("Job")
    migrate = container_of(job, "migrate")
    migrated = run(migrate["args"], process_env(rendered, migrate, secrets, tmp_path))
    assert migrated.returncode == 0, migrated.stderr
    (cronjob,) = rendered.of_kind("CronJob")
    prune = container_of(cronjob, "prune")
    env = process_env(rendered, prune, secrets, tmp_path)
    assert env["ORCHESTRATOR_REDIS_MODE"] == mode
    assert "ORCHESTRATOR_REDIS_URL" not in env
    pruned = run(prune["args"], env)
    assert pruned.returncode == 0, f"exit {pruned.returncode}: {pruned.stderr.strip()}"
    assert pruned.stdout.startswith("pruned history before ")


OLD, NEW = "oldPassw0rdOldPassw0rd", "newPassw0rdNewPassw0rd"


@pytest.fixture
def chart_postgres() -> Iterator[PostgresServer]:
    """As the in-chart PostgreSQL's image makes it: role and database `orchestrator` with the
    password OLD, passwords checked over TCP (scram), the local socket trusted."""
    server = PostgresServer(durable=False).start()
    try:

        async def prepare() -> None:
            admin = await asyncpg.connect(server.url())
            try:
                await admin.execute(f"CREATE ROLE orchestrator LOGIN PASSWORD '{OLD}'")
                await admin.execute("CREATE DATABASE orchestrator OWNER orchestrator")
                (server.data_dir / "pg_hba.conf").write_text(
                    "local all all trust\n"
                    f"host all {SUPERUSER} 127.0.0.1/32 trust\n"  # this test's own admin
                    "host all all 127.0.0.1/32 scram-sha-256\n"
                )
                await admin.execute("SELECT pg_reload_conf()")
            finally:
                await admin.close()

        asyncio.run(prepare())
        yield server
    finally:
        server.cleanup()


def _secrets_at(rendered: Rendered, hook: str | None, port: int) -> dict[tuple[str, str], str]:
    """The release's own Secrets (hook None) or those of one hook event, database URLs pointed
    at the local server (the Service name resolves only in a cluster)."""
    found = {}
    for secret in rendered.of_kind("Secret"):
        events = secret["metadata"]["annotations"].get("helm.sh/hook", "")
        if (hook is None and not events) or (hook and hook in events.split(",")):
            for key, value in (secret.get("data") or {}).items():
                text = base64.b64decode(value).decode()
                if text.startswith("postgresql://"):
                    parts = urlsplit(text)
                    userinfo = parts.netloc.rpartition("@")[0]
                    text = urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{port}"))
                found[(secret["metadata"]["name"], key)] = text
    return found


def _migrate(rendered: Rendered, secrets: dict[tuple[str, str], str], tmp: Path) -> Any:
    (job,) = rendered.of_kind("Job")
    container = container_of(job, "migrate")
    return run(container["args"], process_env(rendered, container, secrets, tmp))


def test_the_documented_postgresql_password_change_passes_the_upgrade_hook(
    chart_postgres: PostgresServer, tmp_path: Path
) -> None:
    """docs/kubernetes.md, "Upgrade": ALTER ROLE on the server, then `helm upgrade --set-string
    postgresql.password=NEW`. The pre-upgrade migrations Job runs before Helm updates the
    release's Secrets, so it read the old password and failed every attempt: the upgrade
    failed and left the release's Secret with a password the server no longer has."""
    port = chart_postgres.port
    values: dict[str, Any] = {"auth": {"secret": "s" * 64}, "postgresql": {"password": OLD}}
    installed = parse("install", values, render(values))
    release = _secrets_at(installed, None, port)
    first = _migrate(
        installed, {**release, **_secrets_at(installed, "post-install", port)}, tmp_path
    )
    assert first.returncode == 0, first.stderr

    async def alter_role() -> None:  # what psql's \password runs
        admin = await asyncpg.connect(chart_postgres.url())
        try:
            await admin.execute(f"ALTER ROLE orchestrator PASSWORD '{NEW}'")
        finally:
            await admin.close()

    asyncio.run(alter_role())
    values = {**values, "postgresql": {"password": NEW}}
    upgraded = parse("upgrade", values, render(values, upgrade=True))
    at_hook = {**release, **_secrets_at(upgraded, "pre-upgrade", port)}  # the old release's
    second = _migrate(upgraded, at_hook, tmp_path)
    assert second.returncode == 0, f"exit {second.returncode}: {second.stderr.strip()}"

"""The migrations hook Job and the prune CronJob as their pods run them: the rendered env
(the settings ConfigMap, then `env`, each secretKeyRef read from the Secrets docs/kubernetes.md
has the platform team create) given to the real `orchestrator` CLI against a real PostgreSQL.

Both read the services' settings ConfigMap, so everything it says about Redis reaches them,
though neither talks to Redis and the chart gives them no Redis Secret.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cli.embedded_postgres import PostgresServer
from tests.chart.conftest import parse, render
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

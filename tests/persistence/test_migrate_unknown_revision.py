"""`orchestrator migrate` on a database a newer build migrated (a rolled-back deployment)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from services.cli.embedded_postgres import PostgresServer
from services.core.settings import ConfigError, load_settings
from services.persistence.cli import migrate_command
from services.persistence.migrate import migrate
from tests.persistence.conftest import fresh_database


async def _at_a_newer_revision(server: PostgresServer) -> str:
    url = await fresh_database(server)
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("UPDATE alembic_version SET version_num = '0003_from_a_newer_build'")
    finally:
        await conn.close()
    return url


def test_migrate_without_down_does_not_blame_a_down_argument(
    postgres_server: PostgresServer,
) -> None:
    """Plain `orchestrator migrate` was given no --down: its error must not say it was."""
    url = asyncio.run(_at_a_newer_revision(postgres_server))
    with pytest.raises(ConfigError) as caught:
        migrate_command(load_settings(database_url=url))
    assert "--down" not in str(caught.value), str(caught.value)

"""`orchestrator migrate`: idempotent, safe when copies race, reversible."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from services.cli.embedded_postgres import PostgresServer
from services.core.settings import ConfigError, load_settings
from services.persistence.cli import migrate_command
from services.persistence.database import create_oneshot_engine
from services.persistence.migrate import current_revision, downgrade, head_revision, migrate
from services.persistence.schema import ALL_TABLES, metadata
from tests.persistence.conftest import fresh_database

OUR_TABLES = {table.name for table in ALL_TABLES}


async def tables(url: str) -> set[str]:
    engine = create_oneshot_engine(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()
    return set(names)


async def test_migrations_started_together_on_an_empty_database_build_one_schema(
    postgres_server: PostgresServer,
) -> None:
    url = await fresh_database(postgres_server)
    await asyncio.gather(*(migrate(url) for _ in range(3)))
    assert await current_revision(url) == head_revision()
    assert await tables(url) == OUR_TABLES | {"alembic_version"}


async def test_migrating_again_changes_nothing(postgres_server: PostgresServer) -> None:
    url = await fresh_database(postgres_server)
    await migrate(url)
    await migrate(url)
    assert await current_revision(url) == head_revision()


async def test_downgrade_to_base_drops_our_tables_and_upgrade_builds_them_again(
    postgres_server: PostgresServer,
) -> None:
    url = await fresh_database(postgres_server)
    await migrate(url)
    await downgrade(url, "base")
    assert await current_revision(url) is None
    assert not (await tables(url)) & OUR_TABLES
    await migrate(url)
    assert await current_revision(url) == head_revision()
    assert await tables(url) >= OUR_TABLES


async def test_the_tables_the_code_queries_are_the_ones_the_migrations_build(
    database_url: str,
) -> None:
    def differences(conn: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))

    engine = create_oneshot_engine(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(differences) == []
    finally:
        await engine.dispose()


def test_migrate_command_reports_the_revision_it_reached(
    postgres_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = asyncio.run(fresh_database(postgres_server))
    assert migrate_command(load_settings(database_url=url)) == 0
    assert capsys.readouterr().out.strip() == f"database schema at revision {head_revision()}"
    assert migrate_command(load_settings(database_url=url), down="base") == 0
    assert capsys.readouterr().out.strip() == "database schema at revision base"


def test_migrate_without_a_database_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="ORCHESTRATOR_DATABASE_URL"):
        migrate_command(load_settings(database_url=None))

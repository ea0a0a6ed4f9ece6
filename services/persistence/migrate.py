"""Applying the schema migrations: idempotent, and safe when several copies run at once.

Every run opens one connection, takes a transaction-scoped advisory lock, and only then lets
Alembic look at `alembic_version` and apply what is missing, all in that one transaction.
Two copies started together (two pods, or the chart's hook Job and a developer) therefore run
one after the other: the second finds the schema at head and does nothing. A failed run rolls
back whole, because PostgreSQL DDL is transactional.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection

from services.persistence.database import create_oneshot_engine

MIGRATION_LOCK_KEY = 0x6F72636865737472  # "orchestr": one lock id for every copy of this product
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
HEAD = "head"
BASE = "base"


def alembic_config() -> Config:
    """Alembic's configuration, built in code: no `alembic.ini` to ship or to find."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


async def locked_migration(database_url: str, work: Callable[[Connection], None]) -> None:
    """Run `work` on one connection, in one transaction, under the migration advisory lock."""
    engine = create_oneshot_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
            await conn.run_sync(work)
    finally:
        await engine.dispose()


def _with_connection(connection: Connection) -> Config:
    config = alembic_config()
    config.attributes["connection"] = connection
    return config


async def migrate(database_url: str, revision: str = HEAD) -> None:
    """Upgrade the schema to `revision` (the latest by default); a no-op when it is there."""
    await locked_migration(
        database_url, lambda conn: command.upgrade(_with_connection(conn), revision)
    )


async def downgrade(database_url: str, revision: str = BASE) -> None:
    """Downgrade the schema to `revision` (`base`: drop every table of ours)."""
    await locked_migration(
        database_url, lambda conn: command.downgrade(_with_connection(conn), revision)
    )


async def current_revision(database_url: str) -> str | None:
    """The revision the database is at; None before the first migration."""
    engine = create_oneshot_engine(database_url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()


def head_revision() -> str:
    """The newest revision in this build."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("no migrations found")
    return head

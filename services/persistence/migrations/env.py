"""Alembic's environment: runs the revisions on the connection `migrate.py` hands over.

`orchestrator migrate` opens the connection, takes the advisory lock and passes the connection
in `config.attributes["connection"]`, so every revision runs inside that one locked
transaction (PostgreSQL DDL is transactional: a failed upgrade leaves nothing behind). Run by
the `alembic` command instead (to write a new revision), it connects to
`ORCHESTRATOR_DATABASE_URL` itself.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from services.persistence.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection, target_metadata=metadata, transaction_per_migration=False
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone() -> None:
    from services.core.settings import load_settings
    from services.persistence.migrate import locked_migration

    url = load_settings().database_url
    if not url:
        raise SystemExit("ORCHESTRATOR_DATABASE_URL is not set")
    await locked_migration(url, _run)


def _offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _offline()
elif (given := context.config.attributes.get("connection")) is not None:
    _run(given)
else:
    asyncio.run(_run_standalone())

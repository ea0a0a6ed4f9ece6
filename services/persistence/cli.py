"""What `orchestrator migrate` and `orchestrator prune` run (the CLI wires them to argparse).

Each returns the process exit code and prints one line saying what happened; a missing
`ORCHESTRATOR_DATABASE_URL` is a `ConfigError` (exit 2, one line, like every bad setting).
"""

from __future__ import annotations

import asyncio
import sys

from alembic.util.exc import CommandError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from services.core.settings import ConfigError, Settings
from services.persistence.database import create_engine
from services.persistence.migrate import HEAD, current_revision, downgrade, migrate
from services.persistence.retention import PruneResult, prune

# PostgreSQL not answering (refused, timed out, gone mid-way): one line, exit 1, as for Redis.
UNREACHABLE = (OSError, DBAPIError, PoolTimeout)


def _unreachable(exc: BaseException) -> int:
    # The type and the driver's words; never the URL (it may carry the password). An error
    # PostgreSQL itself answered (it has a SQLSTATE: a permission, a wrong password) is a
    # refusal, not an outage: "unreachable" sent an SRE to the network instead of the role.
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else ""
    answered = getattr(getattr(exc, "orig", None), "sqlstate", None)
    what = "refused" if answered else "unreachable"
    print(f"orchestrator: PostgreSQL {what}: {type(exc).__name__}: {reason}", file=sys.stderr)
    return 1


def _database_url(settings: Settings) -> str:
    if not settings.database_url:
        raise ConfigError("ORCHESTRATOR_DATABASE_URL: required (postgresql://user@host/db)")
    return settings.database_url


async def apply_migrations(settings: Settings, *, down: str | None = None) -> str | None:
    """Upgrade to the latest revision, or downgrade to `down`; returns the revision reached."""
    url = _database_url(settings)
    if down is None:
        await migrate(url, HEAD)
    else:
        await downgrade(url, down)
    return await current_revision(url)


async def prune_history(settings: Settings) -> PruneResult:
    engine = create_engine(settings)
    try:
        return await prune(engine, settings.history_retention_days)
    finally:
        await engine.dispose()


def migrate_command(settings: Settings, down: str | None = None) -> int:
    """`orchestrator migrate [--down REVISION]`: safe to run from several places at once."""
    try:
        revision = asyncio.run(apply_migrations(settings, down=down))
    except CommandError as exc:
        if down is not None:  # an unknown --down revision
            raise ConfigError(f"--down: {exc}") from None
        # The database is at a revision this build does not know (a newer build migrated it;
        # the deployment was rolled back).
        raise ConfigError(f"the database's schema is unknown to this build ({exc})") from None
    except UNREACHABLE as exc:
        return _unreachable(exc)
    print(f"database schema at revision {revision or 'base'}")
    return 0


def prune_command(settings: Settings) -> int:
    """`orchestrator prune`: delete history older than the retention; prints the counts."""
    try:
        result = asyncio.run(prune_history(settings))
    except UNREACHABLE as exc:
        return _unreachable(exc)
    counts = ", ".join(f"{table} {count}" for table, count in result.deleted.items())
    print(f"pruned history before {result.cutoff.isoformat()}: {counts}")
    return 0

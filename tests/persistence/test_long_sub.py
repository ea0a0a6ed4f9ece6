"""A user whose `sub` is long: migration 0005 put `user_id` into a btree index, and a btree
row holds at most 2704 bytes. Such a token was accepted (no limit on `sub`), the message
answered, and then its history record could never be written; it is refused now (OIDC's 255
characters), and what an earlier version left (records on their way, history) is written
and migrated (the index leaves such users out)."""

from __future__ import annotations

import secrets

import msgspec
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.cli.embedded_postgres import PostgresServer
from services.core.auth import TokenVerifier, issue_token
from services.core.errors import Unauthorized
from services.core.settings import Settings, load_settings
from services.persistence.backlog import backlog
from services.persistence.batch import write_batch
from services.persistence.database import async_engine
from services.persistence.migrate import current_revision, downgrade, head_revision, migrate
from services.persistence.records import publish_record
from services.persistence.schema import messages
from tests.persistence.conftest import eventually, fresh_database, make_record
from tests.persistence.test_writer import running

# Random hex does not compress: PostgreSQL compresses an index row's long value first.
LONG_SUB = secrets.token_hex(1500)  # 3000 ASCII characters, a valid JWT `sub`


def failures() -> float:
    return REGISTRY.get_sample_value("orchestrator_persistence_write_failures_total") or 0.0


async def test_a_long_sub_is_refused_and_an_earlier_versions_records_of_one_are_written(
    redis: Redis, settings: Settings, engine: AsyncEngine
) -> None:
    """The long-sub user's record and a neighbour's in the same batch: both are written. Before,
    PostgreSQL refused the index row with SQLSTATE 54000, which `is_data_error` did not count
    as the record's fault: the whole batch was retried as an outage, for ever, and the writer
    read nothing else meanwhile (one worker: all history stopped)."""
    secret = "k" * 32
    signed = issue_token(
        load_settings(jwt_secret=secret),
        tenant_id="acme",
        user_id=LONG_SUB,
        ttl_seconds=60,
    )
    with pytest.raises(Unauthorized, match="sub must be 1 to 255 characters"):
        TokenVerifier(load_settings(jwt_secret=secret)).verify(signed)
    # Records an earlier version accepted are still on their way:
    long_one = msgspec.structs.replace(make_record("long"), user_id=LONG_SUB)
    neighbour = make_record("neighbour", session_id="s2")
    for record in (long_one, neighbour):
        await publish_record(redis, record)
    before = failures()

    async def written(task_id: str) -> bool:
        async with engine.connect() as conn:
            found = await conn.scalar(select(func.count()).where(messages.c.task_id == task_id))
        return bool(found)

    async with running(redis, settings, engine):
        try:
            await publish_record(redis, make_record("later", tenant_id="globex"))
            await eventually(lambda: written("later"), timeout=5, what="globex's history")
            await eventually(lambda: written("neighbour"), timeout=1, what="the neighbour's")
        finally:
            retried = failures() - before
            left = await backlog(redis)
    assert retried == 0, f"{retried} batch retries; {left} records still waiting"
    assert left == 0


async def test_the_upgrade_to_0005_passes_on_a_history_holding_a_long_sub(
    postgres_server: PostgresServer,
) -> None:
    """History written by 0004 (no index on `user_id`) with one such user's message: the
    upgrade (the chart's migration Job, before every rollout) failed building the index, and
    the release could not be upgraded until someone deleted that user's history by hand."""
    url = await fresh_database(postgres_server)
    await migrate(url, "0004_exact_cost")
    engine = async_engine(url, pool_size=1)
    try:
        async with engine.begin() as conn:
            await write_batch(conn, [make_record("ordinary", session_id="s2")])
            await write_batch(
                conn, [msgspec.structs.replace(make_record("long"), user_id=LONG_SUB)]
            )
    finally:
        await engine.dispose()
    try:
        await migrate(url)
    except Exception as exc:
        raise AssertionError(f"upgrade to head failed: {str(exc)[:300]}") from None
    assert await current_revision(url) == head_revision()
    await downgrade(url, "0004_exact_cost")
    await migrate(url)
    assert await current_revision(url) == head_revision()

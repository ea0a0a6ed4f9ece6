"""Each tenant's share of the api's PostgreSQL pool (persistence/pool_share.py). Found by the
review of cost asymmetry: one tenant's hundred concurrent history reads held every connection
of the pool, and every other tenant's history and usage got 503 (blamed on PostgreSQL, which
was idle) after the pool's timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.errors import RateLimited
from services.persistence.batch import write_batch
from services.persistence.database import async_engine
from services.persistence.history import HistoryStore, Page
from services.persistence.pool_share import PoolShare
from tests.persistence.conftest import make_record

POOL = 5


@pytest.fixture
async def pooled(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The api's kind of pool: POOL connections, no overflow, a short wait for one."""
    engine = async_engine(database_url, pool_size=POOL, max_overflow=0, pool_timeout=1.0)
    yield engine
    await engine.dispose()


async def lock_waiters(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        return int(await conn.scalar(text(query)) or 0)


async def until_waiters(engine: AsyncEngine, count: int) -> None:
    async with asyncio.timeout(10):
        while await lock_waiters(engine) < count:
            await asyncio.sleep(0.02)


async def test_one_tenant_holds_at_most_half_the_pool(
    engine: AsyncEngine, pooled: AsyncEngine
) -> None:
    async with engine.begin() as conn:
        records = [make_record(f"a{i}", tenant_id="tenant-a", event_id=f"1-{i}") for i in range(2)]
        await write_batch(conn, [*records, make_record("b0", tenant_id="tenant-b")])
    history = HistoryStore(pooled, share=PoolShare(POOL, wait_seconds=0.5))
    # Every read waits on a lock the test holds: a connection held as long as it likes.
    async with engine.begin() as blocker:
        await blocker.execute(text("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE"))
        flood = [asyncio.create_task(history.messages("tenant-a", "s1")) for _ in range(6)]
        await until_waiters(engine, 2)
        other = asyncio.create_task(history.messages("tenant-b", "s1"))
        done, _ = await asyncio.wait(
            [other, asyncio.create_task(until_waiters(engine, 3))],
            return_when=asyncio.FIRST_COMPLETED,
        )
        assert other not in done, other.exception()  # it got a connection: waits on the lock
        assert await lock_waiters(engine) == 3  # tenant A holds 2 of 5, not all of them
        refused = await asyncio.gather(*flood[2:], return_exceptions=True)  # past the wait
    answered = await asyncio.gather(*flood[:2], other, return_exceptions=True)
    assert all(isinstance(result, Page) for result in answered), answered
    assert len(answered[-1].messages) == 2  # type: ignore[union-attr]
    assert all(isinstance(result, RateLimited) for result in refused), refused
    assert refused[0].details == {  # type: ignore[union-attr]
        "scope": "tenant_reads",
        "limit": 2,
        "retry_in_ms": 1000,
    }


async def test_a_share_is_forgotten_once_its_reads_are_done() -> None:
    share = PoolShare(4, wait_seconds=1)
    async with share.hold("t1"), share.hold("t1"):
        assert share.per_tenant == 2
    assert not share._tenants  # one entry per tenant with reads in flight only


async def test_a_read_waiting_for_an_extra_slot_runs_once_its_tenant_holds_none() -> None:
    """A read that started waiting for an extra slot because its tenant held a connection kept
    waiting after that connection was returned, and was refused 429 `tenant_reads` while its
    tenant held nothing and the pool had room."""
    share = PoolShare(4, wait_seconds=0.5)  # 2 per tenant, 1 extra slot shared by all
    y_release = asyncio.Event()
    y_holding = asyncio.Event()

    async def tenant_y() -> None:
        async with share.hold("y"), share.hold("y"):  # its second read takes the extra slot
            y_holding.set()
            await y_release.wait()

    busy = asyncio.create_task(tenant_y())
    await y_holding.wait()
    x_second_ran = False

    async def x_second() -> None:
        nonlocal x_second_ran
        async with share.hold("x"):
            x_second_ran = True

    async with share.hold("x"):  # tenant x's first read: one connection of the pool
        second = asyncio.create_task(x_second())
        await asyncio.sleep(0)  # one step: the second read now waits for the (taken) extra slot
        assert not x_second_ran
    # Tenant x holds nothing now; y holds 2 of the 4 connections: x's read has room.
    try:
        await second
    except RateLimited as exc:
        raise AssertionError(
            f"x's read refused while x holds no connection and 2 of 4 are free: {exc.message}"
        ) from exc
    finally:
        y_release.set()
        await busy
    assert x_second_ran

"""Each tenant's share of the api's PostgreSQL pool.

History and usage reads of every tenant on a pod share one pool (`DATABASE_POOL_SIZE`, 5 by
default). One tenant sending a hundred concurrent reads of large pages (within its rate
limits: reads are not sends) held every connection, and every other tenant's history and
usage waited out the pool's timeout and got 503, blamed on a PostgreSQL that was idle. A
tenant may hold at most half of the pool at once: the rest of its reads wait for its own
share, and past the pool's timeout get 429, which is about them, not the database.

With many tenants, a few busy at once are the normal case: three tenants each within their
share held 2 + 2 + 1 of the 5 connections, and a fourth tenant's history read got 503 all the
same. So a read of a tenant that already holds one (an *extra* read) also needs one of the
pool's few extra slots (half the pool less one, shared by every tenant): at least half of the
pool, plus one, is always left for reads of tenants holding none.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from services.core.errors import RateLimited


@dataclass(slots=True)
class _Slots:
    free: asyncio.Semaphore
    users: int = 0  # holders and waiters: the entry goes when none is left
    holding: int = 0  # reads holding a slot of the tenant's share now


class PoolShare:
    def __init__(self, pool_size: int, wait_seconds: float) -> None:
        self.per_tenant = max(1, pool_size // 2)
        self.wait_seconds = wait_seconds
        self._extra_free = self.per_tenant - 1
        self._tenants: dict[str, _Slots] = {}
        # Reads waiting for an extra slot, woken whenever a read ends: each one looks again
        # (an extra slot came free, or its tenant holds none now and needs none).
        self._waiting: list[asyncio.Future[None]] = []

    @asynccontextmanager
    async def hold(self, tenant_id: str) -> AsyncIterator[None]:
        slots = self._tenants.get(tenant_id)
        if slots is None:
            slots = self._tenants[tenant_id] = _Slots(asyncio.Semaphore(self.per_tenant))
        slots.users += 1
        try:
            try:
                async with asyncio.timeout(self.wait_seconds):
                    await slots.free.acquire()
                    try:
                        await self._until_allowed(slots)
                    except BaseException:
                        slots.free.release()
                        raise
            except TimeoutError:
                raise RateLimited(
                    "this tenant's history or usage reads hold their share of this server's "
                    "database connections (or the shared extra ones are all taken); retry "
                    "when they are done",
                    details={
                        "scope": "tenant_reads",
                        "limit": self.per_tenant,
                        "retry_in_ms": 1000,
                    },
                    headers={"Retry-After": "1"},
                ) from None
            extra = slots.holding > 0  # decided with nothing awaited since the check
            if extra:
                self._extra_free -= 1
            slots.holding += 1
            try:
                yield
            finally:
                slots.holding -= 1
                if extra:
                    self._extra_free += 1
                slots.free.release()
                self._wake()
        finally:
            slots.users -= 1
            if not slots.users:
                del self._tenants[tenant_id]

    async def _until_allowed(self, slots: _Slots) -> None:
        """Until the tenant holds no connection (its read needs no extra slot) or an extra
        slot is free. Looked at again whenever a read ends: decided once, a read that found
        its tenant holding one waited for an extra slot even after that read had ended."""
        loop = asyncio.get_running_loop()
        while slots.holding and not self._extra_free:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)

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
        self._extra = asyncio.Semaphore(self.per_tenant - 1)
        self._tenants: dict[str, _Slots] = {}

    @asynccontextmanager
    async def hold(self, tenant_id: str) -> AsyncIterator[None]:
        slots = self._tenants.get(tenant_id)
        if slots is None:
            slots = self._tenants[tenant_id] = _Slots(asyncio.Semaphore(self.per_tenant))
        slots.users += 1
        extra = False
        try:
            try:
                async with asyncio.timeout(self.wait_seconds):
                    await slots.free.acquire()
                    try:
                        if slots.holding:  # the tenant holds a connection already
                            extra = True
                            await self._extra.acquire()
                    except BaseException:
                        extra = False
                        slots.free.release()
                        raise
            except TimeoutError:
                raise RateLimited(
                    f"this tenant already has {slots.holding} history or usage reads running "
                    "on this server; retry when they are done",
                    details={"scope": "tenant_reads", "limit": self.per_tenant},
                    headers={"Retry-After": "1"},
                ) from None
            slots.holding += 1
            try:
                yield
            finally:
                slots.holding -= 1
                if extra:
                    self._extra.release()
                slots.free.release()
        finally:
            slots.users -= 1
            if not slots.users:
                del self._tenants[tenant_id]

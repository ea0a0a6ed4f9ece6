"""A `stop()` cancelled from outside ends its caller too. They awaited their background task
under `suppress(CancelledError)`: a cancel of the caller was passed on to that task (asyncio
cancels what a task waits on), came back as the task's own CancelledError and was eaten, and
the caller ran on as if never cancelled: a shutdown under a deadline went on past it. The
same lost-cancel family as Python 3.11's `wait_for` (services/core/cancel_safe_wait_for.py).
Found by the cancellation review."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from services.api.delivery import SessionHub
from services.core.quotas import QuotaCache, QuotaStore
from services.core.settings import load_settings
from services.core.tiers import DEFAULT_TIERS


async def cancelled_inside(stop: Callable[[], Awaitable[None]]) -> tuple[bool, bool]:
    """Cancel a task while it waits inside `stop()`: (did it run past stop(), did it end
    cancelled)."""
    ran_on = asyncio.Event()

    async def owner() -> None:
        await stop()
        ran_on.set()

    task = asyncio.create_task(owner())
    await asyncio.sleep(0)  # the owner waits for its background task, inside stop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), 5)
    return ran_on.is_set(), task.cancelled()


async def test_a_quota_cache_stop_cancelled_from_outside_ends_its_caller(redis: Redis) -> None:
    cache = QuotaCache(QuotaStore(redis, load_settings(), tiers=DEFAULT_TIERS), ttl=300.0)
    await cache.start()
    assert cache.live
    assert await cancelled_inside(cache.stop) == (False, True)


async def test_a_session_hub_stop_cancelled_from_outside_ends_its_caller(redis: Redis) -> None:
    hub = SessionHub(redis, "pod-stop-cancel")
    await hub.start()
    assert await cancelled_inside(hub.stop) == (False, True)
    await hub.stop()  # what the cancelled stop left: its lanes' connections

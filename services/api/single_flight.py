"""One computation at a time, its answer shared by every caller that came while it ran."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """For an unauthenticated endpoint whose answer costs many Redis commands (`/health/
    detailed`): a flood of concurrent calls makes one computation instead of one each, so it
    cannot take the pool's connections from the message path. A caller that comes after it
    ended starts a new one, so an answer never began more than one computation before its
    call."""

    def __init__(self) -> None:
        self._running: asyncio.Future[T] | None = None

    async def run(self, compute: Callable[[], Awaitable[T]]) -> T:
        running = self._running
        if running is None:
            running = self._running = asyncio.ensure_future(compute())
            running.add_done_callback(self._ended)
        # Shielded: a caller that goes away (its client disconnected) must not cancel the
        # computation the others wait for.
        return await asyncio.shield(running)

    def _ended(self, done: asyncio.Future[T]) -> None:
        if self._running is done:
            self._running = None
        if not done.cancelled():
            done.exception()  # retrieved: every waiter gone is no "never retrieved" warning

"""`asyncio.wait_for` as Python 3.12 has it, for the processes that run on 3.11.

Python 3.11's `wait_for` loses a `cancel()` that arrives after the awaited operation finished
but before the waiting task ran again: it returns the result and the task carries on as if
never cancelled (CPython gh-86296, fixed in 3.12 by rewriting `wait_for` over
`asyncio.timeout`). redis-py awaits every command's write with `asyncio.wait_for` when
`socket_timeout` is set, as ours always is, so any task stopped while a command of its was
being sent could survive its `cancel()`:

- a quota listener kept polling after `QuotaCache.stop()`, and whatever awaited the stop
  (an api's shutdown, a test's teardown) waited for ever;
- a delivery catch-up cancelled because its socket's subscription was lost again went on and
  released the socket while its channel was unsubscribed: the events published until the
  channel was back never reached it, and its cursor then moved past them.

Both were seen in CI (one run in several) and reproduced here: 200 listeners cancelled at
random moments left about one running in every 1 000 stops (none in 4 000 with this).
asyncpg carries the same backport (`asyncpg._asyncio_compat.wait_for`) for its own calls.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109 (the stdlib signature)
    """Await `aw` for at most `timeout` seconds (TimeoutError after that); a cancellation of
    the caller always propagates. The body is CPython 3.12's."""
    if timeout is not None and timeout <= 0:
        fut = asyncio.ensure_future(aw)
        if fut.done():
            return fut.result()
        fut.cancel()
        await asyncio.wait({fut})
        try:
            return fut.result()
        except asyncio.CancelledError as exc:
            raise TimeoutError from exc
    async with asyncio.timeout(timeout):
        return await aw


def install() -> None:
    """Make `asyncio.wait_for` (looked up at each call by redis-py, uvicorn and us) this one,
    on Python versions before 3.12; later ones have it already."""
    if sys.version_info < (3, 12):
        patched: Any = wait_for
        asyncio.wait_for = patched
        asyncio.tasks.wait_for = patched

"""Stopping background tasks so that a cancel of the code stopping them still counts."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel `tasks` (None: not started) and wait until each has ended, however it ends.

    The usual `task.cancel()` then `await task` under `suppress(CancelledError)` also ate a
    cancel of the caller: asyncio passes it on to the awaited task, which ends with the same
    CancelledError, and the caller ran on past its own cancel (a shutdown under a deadline
    went on after it). `asyncio.wait` raises no exception of the tasks, and raises the
    caller's own cancel. What a task failed with is dropped here as it was before: a stop has
    no one to give it to, and the task logged it when it mattered.
    """
    pending = {task for task in tasks if task is not None}
    if not pending:
        return
    for task in pending:
        task.cancel()
    await asyncio.wait(pending)
    for task in pending:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit

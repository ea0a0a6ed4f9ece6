"""`asyncio.wait_for` once `services.core.redis_client` is imported: Python 3.11's lost a
`cancel()` that came as the awaited operation finished (redis-py awaits each command's write
with it), and a stopped task went on running: a quota listener kept polling after its stop
(CI hung in teardowns), a delivery catch-up cancelled by a lost subscription released its
socket anyway (events lost)."""

from __future__ import annotations

import asyncio

import pytest

import services.core.redis_client  # noqa: F401  (installs the fix, as every process does)


async def test_a_cancel_that_comes_as_the_awaited_operation_finishes_is_not_lost() -> None:
    sent = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(asyncio.wait_for(sent, 5))
    await asyncio.sleep(0)  # the task is waiting now
    sent.set_result("written")  # the write is done; the task has not run since
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_wait_gives_the_result_or_times_out() -> None:
    assert await asyncio.wait_for(asyncio.sleep(0, "done"), 5) == "done"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.sleep(5), 0.01)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.sleep(5), 0)
    assert await asyncio.wait_for(asyncio.sleep(0, "ready"), None) == "ready"


async def test_a_zero_timeout_still_takes_a_finished_result() -> None:
    done = asyncio.get_running_loop().create_future()
    done.set_result("there")
    assert await asyncio.wait_for(done, 0) == "there"

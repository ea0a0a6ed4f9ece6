"""An erasure's follow-ups (the dropped tasks' records, their sockets' and their AES's
notices) are sent once, also when the erasure is cut part way (uvicorn cancels a handler at
its shutdown; a lost connection) and a later DELETE of the session finishes it; the stub each
dropped task leaves lives no longer than its ttl. Real Redis, the real ChatService and
TaskStore (tests/integration/test_send_step.py's `service` fixture). Found by the review of
the erasure change that marks a stub `told` (5bfdc28).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from services.core import keys
from tests.integration.test_send_step import (  # noqa: F401  (the fixture)
    TENANT,
    Service,
    service,
)

TASKS = 3


async def _notices(service: Service, task_ids: list[str]) -> Counter[str]:  # noqa: F811
    entries = await service.redis.xrange(keys.CANCEL_STREAM)
    counted: Counter[str] = Counter()
    for _, fields in entries:
        action = b"".join(fields.values()).decode()
        for task_id in task_ids:
            if task_id in action:
                counted[task_id] += 1
    return counted


async def test_an_erasure_cut_part_way_then_finished_tells_each_aes_once(
    service: Service,  # noqa: F811
) -> None:
    """A DELETE cut part way (its pod stopping), then repeated by the client: every dropped
    task's AES is told `chat.cancel` once in all. The next erasure re-sends every notice of
    the session's tasks, also those the cut one had already sent: `told` is marked only after
    the last task's notices (`ChatService.erase_session` -> `TaskStore.told_erased`), so a
    cut between two tasks leaves the first one's AES told twice."""
    await service.tier("enterprise")
    doubled: list[str] = []
    for step in range(0, 120):
        session = f"s{step}"
        task_ids = [await service.send(session) for _ in range(TASKS)]
        erasing = asyncio.create_task(service.chat.erase_session(TENANT, session))
        for _ in range(step):  # the cancel lands at a later point of the erasure each time
            await asyncio.sleep(0)
        erasing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await erasing
        await service.chat.erase_session(TENANT, session)  # the client's repeated DELETE
        counted = await _notices(service, task_ids)
        if any(counted[task_id] > 1 for task_id in task_ids):
            doubled.append(f"cut after {step} loop steps: chat.cancel per task {dict(counted)}")
        if erasing.done() and not erasing.cancelled():
            break  # the first erasure finished before the cancel: later steps change nothing
    assert not doubled, "\n".join(doubled[:5]) + f"\n({len(doubled)} cut points in all)"


def _cancelled_count(tier: str) -> float:
    from services.api import metrics

    return float(metrics.tasks.labels("cancelled", tier)._value.get())


async def test_an_erasure_cut_part_way_counts_each_dropped_task_once(
    service: Service,  # noqa: F811
) -> None:
    """README/metrics: a running task the erasure drops is counted once in
    `tasks_total{status="cancelled"}` (as a cancel is). With PostgreSQL configured the
    erasure queues the tasks' records (a Redis round trip) before it counts them; cut there
    (its pod stopping, or Redis refusing the records' pipeline), the tasks are already kept
    as stubs, and the next DELETE takes them for `kept`, which it never counts: the dropped
    tasks are counted 0 times."""
    service.chat.settings = service.chat.settings.model_copy(
        update={"database_url": "postgresql://unused@127.0.0.1:1/none"}
    )
    await service.tier("enterprise")
    missing: list[str] = []
    for step in range(0, 120):
        session = f"m{step}"
        for _ in range(TASKS):
            await service.send(session)
        before = _cancelled_count("enterprise")
        erasing = asyncio.create_task(service.chat.erase_session(TENANT, session))
        for _ in range(step):
            await asyncio.sleep(0)
        erasing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await erasing
        await service.chat.erase_session(TENANT, session)  # the client's repeated DELETE
        counted = _cancelled_count("enterprise") - before
        if counted != TASKS:
            missing.append(f"cut after {step} loop steps: {counted:.0f} of {TASKS} counted")
        if erasing.done() and not erasing.cancelled():
            break
    assert not missing, "\n".join(missing[:5]) + f"\n({len(missing)} cut points in all)"


async def _gone(service: Service, key: str) -> None:  # noqa: F811
    async with asyncio.timeout(5):
        while await service.redis.exists(key):
            await asyncio.sleep(0.02)


async def test_the_told_mark_does_not_bring_back_an_expired_stub_for_ever(
    service: Service,  # noqa: F811
) -> None:
    """The stub an erasure keeps lives as long as the task could (erase_task.lua keeps its
    ttl) and then goes: README "Redis keys" bounds every key's life. The erasure marks it
    `told` only once its notices are out (one round trip per task and socket notice, after
    the erase script; a retried DELETE may find a stub in its last second). A stub that
    expired in between is recreated by the mark's HSET as `{told: 1}` WITHOUT a ttl: a key
    that lives for ever, and the next DELETE of the session takes it for a running task
    (erase_task.lua: no `ended_by`, no final status), counts it erased again (200, not 404),
    re-sends its notices and keeps a stub with no ttl."""
    await service.tier("pro")
    task_id = await service.send("s-erased")
    stub = keys.task_state(TENANT, "s-erased", task_id)
    erased = await service.chat.tasks.erase_session(TENANT, "s-erased")
    assert [ended.ref.task_id for ended in erased.running] == [task_id]
    # The stub's last moment comes while its notices are being sent.
    await service.redis.pexpire(stub, 50)
    await _gone(service, stub)
    async with service.redis.pipeline(transaction=False) as pipe:
        for ended in erased.running:
            service.chat.tasks.queue_told(pipe, ended.ref)
        await pipe.execute()

    recreated, ttl = await service.redis.hgetall(stub), await service.redis.ttl(stub)
    again = await service.chat.tasks.erase_session(TENANT, "s-erased")
    assert not recreated or ttl > 0, (
        f"the stub expired before it was marked told; the mark recreated it as "
        f"{recreated!r} with ttl {ttl} (never expires); the next erasure of the session "
        f"counts it again: erased={again.tasks}, running="
        f"{[t.ref.task_id for t in again.running]}, its new stub's ttl "
        f"{await service.redis.ttl(stub)}"
    )

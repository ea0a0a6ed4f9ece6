"""Deadlines fired by a partition's lease holder, across a worker that died mid-firing."""

from __future__ import annotations

import time
from datetime import timedelta

from redis.asyncio import Redis

from services.core import events, keys
from services.core.actions import ChatProcess, User, encode_action, utcnow
from services.core.scripts import Scripts
from services.core.settings import load_settings
from services.core.tasks import TaskRef, TaskStatus, TaskStore, encode_json
from services.worker.schedule import PartitionSchedule, fire_due_all

SETTINGS = load_settings(callback_partitions=1, database_url="postgresql://u:p@127.0.0.1:1/db")
TIMED_OUT = {
    "code": "timed_out",
    "message": "the task did not finish before its deadline",
    "details": {},
}


async def overdue_task(redis: Redis) -> tuple[TaskStore, TaskRef]:
    """Task t1 of acme/s1, created as the api creates it, its deadline passed and due in
    partition 0's deadlines."""
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    ref = TaskRef("acme", "s1", "t1")
    action = ChatProcess(
        tenant_id="acme",
        session_id="s1",
        task_id="t1",
        agent_id="default",
        message="hi",
        user=User(id="alice"),
        callback_queue=keys.callback_stream(0),
        deadline=utcnow() - timedelta(seconds=1),
    )
    fields = {
        "status": TaskStatus.processing,
        "agent_id": "default",
        "user_id": "alice",
        "tier": "pro",
        "created_ms": str(int(time.time() * 1000)),
        "action": encode_action(action).decode(),
    }
    await tasks.apply(ref, "create", fields=fields)
    member = keys.task_member("acme", "s1", "t1")
    await redis.zadd(keys.partition_deadlines(0), {member: time.time() - 1})
    return tasks, ref


async def test_a_timeout_applied_by_a_worker_that_died_still_reaches_the_aes_and_history(
    redis: Redis,
) -> None:
    """The owner of partition 0 fired the deadline: the task script made the task `timed_out`
    (and the client got `chat.error`), then the worker was SIGKILLed before it told the AES
    (`chat.cancel`, reason "timed out") and before it added the task's record for PostgreSQL
    (the only record of the message: history is written when a task ends). The member is
    still due, so the next owner fires it again. Callbacks handle this very crash (a
    redelivered completion finds the task final and publishes its record again); the timer
    does not: the second firing finds the task final and does nothing but remove the member,
    so the AES never hears of the timeout and the message never reaches the history."""
    tasks, ref = await overdue_task(redis)
    # What the dead worker got done: `PartitionSchedule._time_out`'s script, nothing after.
    body = events.event_body(events.CHAT_ERROR, TIMED_OUT, ref.task_id)
    died = await tasks.apply(
        ref,
        "timeout",
        body=body,
        fields={"status": TaskStatus.timed_out, "error": encode_json(TIMED_OUT)},
    )
    assert died is not None
    assert died.verdict.value == "ok"

    await fire_due_all(redis, [PartitionSchedule(redis, tasks, 0)])  # the next owner

    assert await redis.zcard(keys.partition_deadlines(0)) == 0  # the timer is gone for good
    notices = await redis.xrange(keys.CANCEL_STREAM)
    records = await redis.xrange(keys.PERSIST_RECORDS)
    assert len(records) == 1, "the timed-out task never reaches PostgreSQL's history"
    assert len(notices) == 1, "the AES is never told that the task timed out"

"""What the worker's counters say after a redelivery (the worker's own crash, lost acks)."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.core import keys
from services.core.actions import ACTION_FIELD, ExecutionCompleted, encode_action
from services.core.scripts import Scripts
from services.core.settings import load_settings
from services.core.tasks import TaskRef, TaskStore
from services.worker.callbacks import CallbackEffects
from services.worker.metrics import TenantLabels
from services.worker.partition import PartitionConsumer

SETTINGS = load_settings(worker_sleep_seconds=0.05, callback_partitions=1)
STREAM = keys.callback_stream(0)


def late(reason: str) -> float:
    return REGISTRY.get_sample_value("orchestrator_late_callbacks_total", {"reason": reason}) or 0.0


async def drain(redis: Redis) -> None:
    scripts = Scripts(redis)
    tasks = TaskStore(redis, scripts, SETTINGS)
    consumer = PartitionConsumer(
        redis, CallbackEffects(tasks, scripts, SETTINGS), tasks, SETTINGS, "w1", 0, TenantLabels(5)
    )
    running = asyncio.create_task(consumer.run())
    async with asyncio.timeout(10):
        while True:
            await asyncio.sleep(0.02)
            groups = await redis.xinfo_groups(STREAM)
            if groups and groups[0]["pending"] == 0 and groups[0]["lag"] == 0:
                break
    consumer.stop()
    await running


async def test_a_redelivered_completion_is_not_counted_as_a_late_callback(redis: Redis) -> None:
    """README: "late callbacks are dropped and counted" (`orchestrator_late_callbacks_total`,
    the dashboard's late-callbacks panel): callbacks the AES sent after its task ended. A
    completion that arrived in time, applied, and was delivered again because the worker
    died before acknowledging it (at most a batch, and up to 32 lazy acks, per partition)
    is counted as late too: every worker crash or lost reply shows up as AES lateness."""
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    await tasks.apply(TaskRef("acme", "s1", "t1"), "create", fields={"status": "processing"})
    done = ExecutionCompleted(tenant_id="acme", session_id="s1", task_id="t1", content="hi")
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(done)})
    await drain(redis)
    before = late("final")

    await redis.xgroup_setid(STREAM, keys.WORKER_GROUP, "0")  # the ack was lost: redelivered
    await drain(redis)

    assert late("final") == before, "a redelivery of an on-time completion counted as late"


async def test_a_callback_after_the_task_ended_otherwise_is_counted_as_late(redis: Redis) -> None:
    """The other side of the same counter: a completion for a task the client cancelled is
    the AES's lateness, and is counted."""
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    ref = TaskRef("acme", "s2", "t2")
    await tasks.apply(ref, "create", fields={"status": "processing"})
    await tasks.apply(ref, "cancel", fields={"status": "cancelled"})
    done = ExecutionCompleted(tenant_id="acme", session_id="s2", task_id="t2", content="hi")
    before = late("final")
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(done)})
    await drain(redis)
    assert late("final") == before + 1

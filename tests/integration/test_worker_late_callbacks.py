"""What the worker's counters say after a redelivery (the worker's own crash, lost acks)."""

from __future__ import annotations

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.core import keys
from services.core.actions import ACTION_FIELD, ExecutionCompleted, encode_action
from services.core.scripts import Scripts
from services.core.tasks import TaskRef, TaskStore
from tests.integration.test_worker_partition import SETTINGS, STREAM, consumer_of, drain


def late(reason: str) -> float:
    return REGISTRY.get_sample_value("orchestrator_late_callbacks_total", {"reason": reason}) or 0.0


async def run_partition(redis: Redis) -> None:
    """The partition's consumer, until nothing is pending or unread."""
    await drain(consumer_of(redis, "w1"), redis)


async def test_a_redelivered_completion_is_not_counted_as_a_late_callback(redis: Redis) -> None:
    """README: "late callbacks are dropped and counted" (`orchestrator_late_callbacks_total`,
    the dashboard's late-callbacks panel): callbacks the AES sent after its task ended. A
    completion that arrived in time, applied, and was delivered again because the worker
    died before acknowledging it (at most a batch, and up to 32 lazy acks, per partition)
    is counted as late too: every worker crash or lost reply shows up as AES lateness."""
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    await tasks.apply(TaskRef("acme", "s1", "t1"), "create", fields={"status": "processing"})
    done = ExecutionCompleted(
        attempt=1, tenant_id="acme", session_id="s1", task_id="t1", content="hi"
    )
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(done)})
    await run_partition(redis)
    before = late("final")

    await redis.xgroup_setid(STREAM, keys.WORKER_GROUP, "0")  # the ack was lost: redelivered
    await run_partition(redis)

    assert late("final") == before, "a redelivery of an on-time completion counted as late"


async def test_a_callback_after_the_task_ended_otherwise_is_counted_as_late(redis: Redis) -> None:
    """The other side of the same counter: a completion for a task the client cancelled is
    the AES's lateness, and is counted."""
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    ref = TaskRef("acme", "s2", "t2")
    await tasks.apply(ref, "create", fields={"status": "processing"})
    await tasks.apply(ref, "cancel", fields={"status": "cancelled"})
    done = ExecutionCompleted(
        attempt=1, tenant_id="acme", session_id="s2", task_id="t2", content="hi"
    )
    before = late("final")
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(done)})
    await run_partition(redis)
    assert late("final") == before + 1


async def test_a_callback_for_a_task_nobody_knows_is_counted_as_unknown(redis: Redis) -> None:
    """An answer naming another tenant's (or session's) task, or one that expired or was
    erased, was dropped without a trace: an AES copying the wrong ids lost every answer and
    no counter moved. It is counted as late, reason `unknown`."""
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    await tasks.apply(TaskRef("acme", "s3", "t3"), "create", fields={"status": "processing"})
    wrong_tenant = ExecutionCompleted(
        attempt=1, tenant_id="other", session_id="s3", task_id="t3", content="hi"
    )
    before = late("unknown")
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(wrong_tenant)})
    await run_partition(redis)
    assert late("unknown") == before + 1
    state = await redis.hget(keys.task_state("acme", "s3", "t3"), "status")
    assert state == b"processing"  # and the real task was not touched

"""The worker's partition loop: effects then acks, dead letters for what can never apply."""

from __future__ import annotations

import asyncio
import json

from redis.asyncio import Redis

from services.core import events, keys
from services.core.actions import ACTION_FIELD, ExecutionChunk, ExecutionCompleted, encode_action
from services.core.scripts import Scripts
from services.core.settings import load_settings
from services.core.tasks import TaskRef, TaskStore
from services.worker.callbacks import CallbackEffects
from services.worker.metrics import TenantLabels
from services.worker.partition import PartitionConsumer

SETTINGS = load_settings(worker_sleep_seconds=0.05, callback_partitions=1)
STREAM = keys.callback_stream(0)


async def run_until_drained(redis: Redis) -> None:
    """Run one partition consumer until the group has nothing pending or unread."""
    scripts = Scripts(redis)
    tasks = TaskStore(redis, scripts, SETTINGS)
    effects = CallbackEffects(tasks, scripts, SETTINGS)
    consumer = PartitionConsumer(redis, effects, tasks, SETTINGS, "w1", 0, TenantLabels(5))
    running = asyncio.create_task(consumer.run())
    async with asyncio.timeout(10):
        while True:
            await asyncio.sleep(0.02)
            groups = await redis.xinfo_groups(STREAM)
            if groups and groups[0]["pending"] == 0 and groups[0]["lag"] == 0:
                break
    consumer.stop()
    await running


async def test_malformed_entries_go_to_dead_letters_and_the_rest_is_applied(
    redis: Redis,
) -> None:
    ref = TaskRef("acme", "s1", "t1")
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    await tasks.apply(ref, "create", fields={"status": "processing"})
    await redis.xadd(STREAM, {ACTION_FIELD: b"{not json"})
    await redis.xadd(STREAM, {"wrong_field": b"{}"})
    await redis.xadd(STREAM, {ACTION_FIELD: b'{"action_type": "execution.teleport"}'})
    chunk = ExecutionChunk(tenant_id="acme", session_id="s1", task_id="t1", seq=1, delta="hi")
    done = ExecutionCompleted(tenant_id="acme", session_id="s1", task_id="t1", content="hi")
    for action in (chunk, chunk, done):
        await redis.xadd(STREAM, {ACTION_FIELD: encode_action(action)})

    await run_until_drained(redis)

    dead = await redis.xrange(keys.DEAD_LETTERS)
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert len(reasons) == 3
    assert any("malformed action" in r for r in reasons)
    assert any("no 'action' field" in r for r in reasons)
    assert any("execution.teleport" in r for r in reasons)
    log = await redis.xrange(keys.session_log("acme", "s1"))
    kinds = [json.loads(b"{" + fields[b"e"])["type"] for _, fields in log]
    assert kinds == [events.CHAT_CHUNK, events.CHAT_RESPONSE]
    state = await tasks.read(ref)
    assert state is not None
    assert state["status"] == "completed"


async def test_entries_left_pending_by_a_dead_owner_are_adopted(redis: Redis) -> None:
    ref = TaskRef("acme", "s2", "t2")
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    await tasks.apply(ref, "create", fields={"status": "processing"})
    done = ExecutionCompleted(tenant_id="acme", session_id="s2", task_id="t2", content="ok")
    await redis.xgroup_create(STREAM, keys.WORKER_GROUP, id="0", mkstream=True)
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(done)})
    # A worker that read the entry and died before acknowledging it.
    await redis.xreadgroup(keys.WORKER_GROUP, "dead-worker", {STREAM: ">"}, count=10)

    await run_until_drained(redis)

    state = await tasks.read(ref)
    assert state is not None
    assert state["status"] == "completed"

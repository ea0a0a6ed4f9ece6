"""The worker's partition loop: effects then acks (with the next read), dead letters for what
can never apply, once-only sends, and the timers of all partitions."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError

from services.core import events, keys
from services.core.actions import (
    ACTION_FIELD,
    Callback,
    ChatProcess,
    ExecutionChunk,
    ExecutionCompleted,
    Usage,
    User,
    WebsocketBroadcast,
    WebsocketSend,
    decode_action,
    encode_action,
    utcnow,
)
from services.core.delivery_lag import DELIVERY_LAG_METRIC
from services.core.scripts import Scripts
from services.core.settings import Settings, load_settings
from services.core.streams import Entry, adopt
from services.core.tasks import TaskRef, TaskStore
from services.core.usage import UsageCounter
from services.worker.callbacks import DEDUPE_TTL_SECONDS, CallbackEffects, FollowUp, Position
from services.worker.leases import PartitionLeases
from services.worker.main import Worker
from services.worker.metrics import TenantLabels
from services.worker.partition import PartitionConsumer
from services.worker.schedule import PartitionSchedule, fire_due_all

SETTINGS = load_settings(worker_sleep_seconds=0.05, callback_partitions=1)
STREAM = keys.callback_stream(0)


async def run_until_drained(
    redis: Redis, partition: int = 0, settings: Settings = SETTINGS
) -> None:
    """Run one partition consumer until the group has nothing pending or unread."""
    scripts = Scripts(redis)
    tasks = TaskStore(redis, scripts, settings)
    effects = CallbackEffects(tasks, scripts, settings)
    consumer = PartitionConsumer(redis, effects, tasks, settings, "w1", partition, TenantLabels(5))
    running = asyncio.create_task(consumer.run())
    stream = keys.callback_stream(partition)
    async with asyncio.timeout(10):
        while True:
            await asyncio.sleep(0.02)  # the group's counts in Redis: nothing to wait on
            groups = await redis.xinfo_groups(stream)
            if groups and groups[0]["pending"] == 0 and groups[0]["lag"] == 0:
                break
    consumer.stop()
    await running


async def test_a_sessions_sends_from_two_callback_streams_are_each_applied_once(
    redis: Redis,
) -> None:
    """An AES working on a task of session A (its callback_queue: A's partition) sends a
    message to session B, whose own sends are on B's partition. Each entry is applied once,
    whichever partition is consumed first: the session keeps a mark per stream (one mark for
    both dropped the older entry of the partition consumed second)."""
    settings = load_settings(worker_sleep_seconds=0.05, callback_partitions=2)

    def send(n: int) -> bytes:
        return encode_action(WebsocketSend(tenant_id="acme", session_id="b", message={"n": n}))

    await redis.xadd(keys.callback_stream(0), {ACTION_FIELD: send(1)})
    await redis.xadd(keys.callback_stream(1), {ACTION_FIELD: send(2)})
    await run_until_drained(redis, 1, settings)  # partition 0's worker lags behind
    await run_until_drained(redis, 0, settings)
    await redis.xgroup_setid(keys.callback_stream(0), keys.WORKER_GROUP, "0")  # redelivered
    await run_until_drained(redis, 0, settings)

    entries = await redis.xrange(keys.session_log("acme", "b"))
    assert sorted(json.loads(b"{" + fields[b"e"])["data"]["n"] for _, fields in entries) == [1, 2]


async def test_malformed_entries_go_to_dead_letters_and_the_rest_is_applied(
    redis: Redis,
) -> None:
    ref = TaskRef("acme", "s1", "t1")
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    await tasks.apply(ref, "create", fields={"status": "processing"})
    await redis.xadd(STREAM, {ACTION_FIELD: b"{not json"})
    await redis.xadd(STREAM, {"wrong_field": b"{}"})
    await redis.xadd(STREAM, {ACTION_FIELD: b'{"action_type": "execution.teleport"}'})
    chunk = ExecutionChunk(
        attempt=1, tenant_id="acme", session_id="s1", task_id="t1", seq=1, delta="hi"
    )
    done = ExecutionCompleted(
        attempt=1, tenant_id="acme", session_id="s1", task_id="t1", content="hi"
    )
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
    done = ExecutionCompleted(
        attempt=1, tenant_id="acme", session_id="s2", task_id="t2", content="ok"
    )
    await redis.xgroup_create(STREAM, keys.WORKER_GROUP, id="0", mkstream=True)
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(done)})
    # A worker that read the entry and died before acknowledging it.
    await redis.xreadgroup(keys.WORKER_GROUP, "dead-worker", {STREAM: ">"}, count=10)

    await run_until_drained(redis)

    state = await tasks.read(ref)
    assert state is not None
    assert state["status"] == "completed"


def send(session: str, n: int) -> bytes:
    return encode_action(WebsocketSend(tenant_id="acme", session_id=session, message={"n": n}))


async def logged(redis: Redis, session: str) -> list[int]:
    """The `n` of every `message` event in the session's log, in log order."""
    entries = await redis.xrange(keys.session_log("acme", session))
    frames = [json.loads(b"{" + fields[b"e"]) for _, fields in entries]
    return [frame["data"]["n"] for frame in frames if frame["type"] == events.MESSAGE]


SMALL_BATCHES = load_settings(worker_sleep_seconds=0.05, callback_partitions=1, worker_batch_size=3)


def consumer_of(
    redis: Redis,
    name: str,
    effects: CallbackEffects | None = None,
    settings: Settings = SETTINGS,
) -> PartitionConsumer:
    scripts = Scripts(redis)
    tasks = TaskStore(redis, scripts, settings)
    effects = effects or CallbackEffects(tasks, scripts, settings)
    return PartitionConsumer(redis, effects, tasks, settings, name, 0, TenantLabels(5))


async def drain(consumer: PartitionConsumer, redis: Redis) -> None:
    """Run `consumer` until the group has nothing pending or unread, then stop it."""
    running = asyncio.create_task(consumer.run())
    async with asyncio.timeout(10):
        while True:
            await asyncio.sleep(0.02)
            groups = await redis.xinfo_groups(STREAM)
            if groups and groups[0]["pending"] == 0 and groups[0]["lag"] == 0:
                break
    consumer.stop()
    await running


def worker_lags() -> float:
    """How many deliveries the worker hop has timed so far in this process."""
    labels = {"hop": "worker"}
    return REGISTRY.get_sample_value(f"{DELIVERY_LAG_METRIC}_count", labels) or 0.0


async def test_a_redelivered_send_or_broadcast_applies_once_with_one_mark_per_session(
    redis: Redis,
) -> None:
    for n in (1, 2, 3):
        await redis.xadd(STREAM, {ACTION_FIELD: send("s1", n)})
    everyone = WebsocketBroadcast(tenant_id="acme", session_id="s1", message={"all": 1})
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(everyone)})
    pubsub = redis.pubsub()
    await pubsub.ssubscribe(keys.tenant_channel("acme"))
    timed = worker_lags()
    await drain(consumer_of(redis, "w1"), redis)
    assert await logged(redis, "s1") == [1, 2, 3]
    assert worker_lags() == timed + 4  # each applied entry's delivery lag, once

    # Every entry delivered again (acknowledgements lost, say): nothing is applied twice.
    await redis.xgroup_setid(STREAM, keys.WORKER_GROUP, "0")
    await drain(consumer_of(redis, "w2"), redis)
    assert await logged(redis, "s1") == [1, 2, 3]
    assert worker_lags() == timed + 4  # a redelivery that changed nothing is not timed
    broadcasts = []
    while (message := await pubsub.get_message(timeout=0.2)) is not None:
        if message["type"] == "smessage":
            broadcasts.append(message["data"])
    await pubsub.aclose()
    assert len(broadcasts) == 1

    # One once-only mark per session (and per tenant), not one key per event.
    marks = [key async for key in redis.scan_iter(match="*applied*")]
    assert sorted(marks) == sorted(
        [keys.session_applied("acme", "s1").encode(), keys.tenant_applied("acme").encode()]
    )
    assert 0 < await redis.ttl(keys.session_applied("acme", "s1")) <= DEDUPE_TTL_SECONDS


async def test_after_a_takeover_what_the_dead_owner_applied_is_not_applied_again(
    redis: Redis,
) -> None:
    for n in (1, 2, 3):
        await redis.xadd(STREAM, {ACTION_FIELD: send("s1", n)})
    dying = consumer_of(redis, "w1")
    dying.queue_acks = lambda pipe: 0  # type: ignore[method-assign]  # died before acking
    running = asyncio.create_task(dying.run())
    async with asyncio.timeout(10):
        while await logged(redis, "s1") != [1, 2, 3]:
            await asyncio.sleep(0.02)
    dying.stop()
    await running
    assert (await redis.xpending(STREAM, keys.WORKER_GROUP))["pending"] == 3
    for n in (4, 5):
        await redis.xadd(STREAM, {ACTION_FIELD: send("s1", n)})

    await drain(consumer_of(redis, "w2"), redis)

    assert await logged(redis, "s1") == [1, 2, 3, 4, 5]


class FailOnce(CallbackEffects):
    """Effects whose `websocket.send` of `n == 2` fails the first time (an error in Redis)."""

    failed = False

    async def queue(
        self,
        action: Callback,
        pipe: Pipeline,
        traceparent: str = "",
        position: Position | None = None,
        after_seq: int = 0,
    ) -> FollowUp | None:
        if isinstance(action, WebsocketSend) and action.message["n"] == 2 and not self.failed:
            self.failed = True
            pipe.execute_command("EVAL", "return redis.error_reply('ERR boom')", 0)
            return None
        return await super().queue(action, pipe, traceparent, position, after_seq)


class ChunkFailsOnce(CallbackEffects):
    """Effects whose chunk of seq 2 fails the first time (an error in Redis), alone."""

    failed = False

    async def queue(
        self,
        action: Callback,
        pipe: Pipeline,
        traceparent: str = "",
        position: Position | None = None,
        after_seq: int = 0,
    ) -> FollowUp | None:
        if isinstance(action, ExecutionChunk) and action.seq == 2 and not self.failed:
            self.failed = True
            pipe.execute_command("EVAL", "return redis.error_reply('ERR boom')", 0)
            return None
        return await super().queue(action, pipe, traceparent, position, after_seq)


class AlwaysFails(CallbackEffects):
    """Effects whose `websocket.send` of `n == 1` always fails (an error in Redis)."""

    runs = 0

    async def queue(
        self,
        action: Callback,
        pipe: Pipeline,
        traceparent: str = "",
        position: Position | None = None,
        after_seq: int = 0,
    ) -> FollowUp | None:
        if isinstance(action, WebsocketSend) and action.message["n"] == 1:
            self.runs += 1
            pipe.execute_command("EVAL", "return redis.error_reply('ERR boom')", 0)
            return None
        return await super().queue(action, pipe, traceparent, position, after_seq)


async def test_a_failing_entry_is_dead_lettered_after_exactly_max_delivery_attempts_runs(
    redis: Redis,
) -> None:
    """Each retry takes the partition's pending entries over and reads them again: only the
    read may count a delivery (a claim that counted as well dead-lettered after 3 of 5)."""
    settings = load_settings(
        worker_sleep_seconds=0.05, callback_partitions=1, max_delivery_attempts=5
    )
    await redis.xadd(STREAM, {ACTION_FIELD: send("s1", 1)})
    await redis.xadd(STREAM, {ACTION_FIELD: send("s2", 2)})
    scripts = Scripts(redis)
    effects = AlwaysFails(TaskStore(redis, scripts, settings), scripts, settings)

    await drain(consumer_of(redis, "w1", effects, settings), redis)

    assert effects.runs == 5
    assert await redis.xlen(keys.DEAD_LETTERS) == 1
    assert await logged(redis, "s2") == [2]


class SecondFailsOnceAfterTheFirst(AlwaysFails):
    """As AlwaysFails; then the send of `n == 2`, which waited for it, fails once."""

    def __init__(self, tasks: TaskStore, scripts: Scripts, settings: Settings) -> None:
        super().__init__(tasks, scripts, settings)
        self.second_failed = False

    async def queue(
        self,
        action: Callback,
        pipe: Pipeline,
        traceparent: str = "",
        position: Position | None = None,
        after_seq: int = 0,
    ) -> FollowUp | None:
        first_is_spent = self.runs >= self.settings.max_delivery_attempts
        second = isinstance(action, WebsocketSend) and action.message["n"] == 2
        if second and first_is_spent and not self.second_failed:
            self.second_failed = True
            pipe.execute_command("EVAL", "return redis.error_reply('ERR boom')", 0)
            return None
        return await super().queue(action, pipe, traceparent, position, after_seq)


async def test_an_entry_that_waited_for_a_failing_predecessor_gets_its_own_attempts(
    redis: Redis,
) -> None:
    """Every delivery of the send waiting for its session's failing predecessor counted in
    Redis: once the predecessor was dead-lettered, one transient failure of the next send
    dead-lettered it at once (its delivery count was already MAX_DELIVERY_ATTEMPTS)."""
    settings = load_settings(
        worker_sleep_seconds=0.05, callback_partitions=1, max_delivery_attempts=5
    )
    await redis.xadd(STREAM, {ACTION_FIELD: send("s1", 1)})
    await redis.xadd(STREAM, {ACTION_FIELD: send("s1", 2)})
    scripts = Scripts(redis)
    effects = SecondFailsOnceAfterTheFirst(TaskStore(redis, scripts, settings), scripts, settings)

    await drain(consumer_of(redis, "w1", effects, settings), redis)

    assert effects.runs == 5
    assert effects.second_failed
    dead = await redis.xrange(keys.DEAD_LETTERS)
    assert [decode_action(fields[ACTION_FIELD.encode()]).message for _, fields in dead] == [
        {"n": 1}
    ]
    assert await logged(redis, "s1") == [2]


@pytest.mark.parametrize("settings", [SETTINGS, SMALL_BATCHES], ids=["one-batch", "batches-of-3"])
async def test_a_send_after_a_failed_one_of_its_session_waits_for_it(
    redis: Redis, settings: Settings
) -> None:
    for n in (1, 2, 3, 4):
        await redis.xadd(STREAM, {ACTION_FIELD: send("s1", n)})
        await redis.xadd(STREAM, {ACTION_FIELD: send("s2", n)})
    scripts = Scripts(redis)
    tasks = TaskStore(redis, scripts, settings)
    effects = FailOnce(tasks, scripts, settings)

    await drain(consumer_of(redis, "w1", effects, settings), redis)

    assert effects.failed
    assert await logged(redis, "s1") == [1, 2, 3, 4]  # 3 and 4 did not overtake 2
    assert await logged(redis, "s2") == [1, 2, 3, 4]
    assert await redis.xlen(keys.DEAD_LETTERS) == 0


async def test_a_chunk_failing_alone_is_not_skipped_by_the_next_ones(redis: Redis) -> None:
    """Chunks 1-3 and the completion in one batch; chunk 2's script fails alone. Chunk 3 and
    the completion wait for it (a chunk 3 applied first made chunk 2 a 'duplicate': lost)."""
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    await tasks.apply(TaskRef("acme", "s1", "t1"), "create", fields={"status": "processing"})
    for seq in (1, 2, 3):
        chunk = ExecutionChunk(
            tenant_id="acme", session_id="s1", task_id="t1", attempt=1, seq=seq, delta=f"d{seq}"
        )
        await redis.xadd(STREAM, {ACTION_FIELD: encode_action(chunk)})
    done = ExecutionCompleted(
        tenant_id="acme", session_id="s1", task_id="t1", attempt=1, content="d1d2d3", usage=Usage()
    )
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(done)})
    scripts = Scripts(redis)
    effects = ChunkFailsOnce(TaskStore(redis, scripts, SETTINGS), scripts, SETTINGS)

    await drain(consumer_of(redis, "w1", effects), redis)

    assert effects.failed
    entries = await redis.xrange(keys.session_log("acme", "s1"))
    frames = [json.loads(b"{" + fields[b"e"]) for _, fields in entries]
    assert [(f["type"], f["data"].get("seq")) for f in frames] == [
        (events.CHAT_CHUNK, 1),
        (events.CHAT_CHUNK, 2),
        (events.CHAT_CHUNK, 3),
        (events.CHAT_RESPONSE, None),
    ]
    assert await redis.xlen(keys.DEAD_LETTERS) == 0


async def test_with_small_batches_each_is_read_with_the_effects_of_the_one_before(
    redis: Redis,
) -> None:
    for n in range(1, 21):
        await redis.xadd(STREAM, {ACTION_FIELD: send(f"s{n % 3}", n)})
    consumer = consumer_of(redis, "w1", settings=SMALL_BATCHES)
    blocking_reads = 0
    real_new = consumer._new

    async def counting_new() -> tuple[list[Entry], bool]:
        nonlocal blocking_reads
        blocking_reads += 1
        return await real_new()

    consumer._new = counting_new  # type: ignore[method-assign]
    await drain(consumer, redis)

    for session in range(3):
        assert await logged(redis, f"s{session}") == [n for n in range(1, 21) if n % 3 == session]
    # 7 batches of at most 3: after the first, each came with the effects of the one before.
    assert blocking_reads < 7


async def test_a_completions_usage_is_counted_with_the_next_round_trip_even_if_scripts_vanish(
    redis: Redis,
) -> None:
    ref = TaskRef("acme", "s1", "t1")
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    await tasks.apply(ref, "create", fields={"status": "processing"})
    done = ExecutionCompleted(
        attempt=1,
        tenant_id="acme",
        session_id="s1",
        task_id="t1",
        content="hi",
        usage=Usage(input_tokens=30, output_tokens=12, cost=0.5),
    )
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(done)})
    consumer = consumer_of(redis, "w1")
    await consumer.effects.scripts.load()
    await redis.xgroup_create(STREAM, keys.WORKER_GROUP, id="0", mkstream=True)
    batch, _ = await consumer._new()
    assert await consumer._handle(batch)
    counter = UsageCounter(redis)
    assert (await counter.today("acme")).tokens == 0  # not in the effects' round trip

    await redis.script_flush()  # Redis restarted between the two round trips
    await consumer._flush_acks()

    assert (await redis.xpending(STREAM, keys.WORKER_GROUP))["pending"] == 0  # acknowledged
    assert (await counter.today("acme")).tokens == 0  # NOSCRIPT: kept for the next one
    await consumer._flush_acks()
    await consumer._flush_acks()
    usage = await counter.today("acme")
    assert (usage.tokens, usage.tasks, usage.cost) == (42, 1, 0.5)


async def test_a_read_whose_reply_was_lost_sends_the_loop_back_to_its_pending_list(
    redis: Redis,
) -> None:
    consumer = consumer_of(redis, "w1")
    await redis.xgroup_create(STREAM, keys.WORKER_GROUP, id="0", mkstream=True)
    await redis.xadd(STREAM, {ACTION_FIELD: send("s1", 1)})
    # Redis ran a read for w1 but its reply never arrived.
    await redis.xreadgroup(keys.WORKER_GROUP, "w1", {STREAM: ">"}, count=10)
    await redis.xadd(STREAM, {ACTION_FIELD: send("s1", 2)})

    entries, missed = await consumer._new()

    assert missed
    assert len(entries) == 1
    await drain(consumer, redis)
    assert await logged(redis, "s1") == [1, 2]


async def test_a_read_ahead_after_a_read_whose_reply_was_lost_waits_for_its_entries(
    redis: Redis,
) -> None:
    """A cluster pipeline runs again each command whose reply it lacks: the entries of the
    lost read are older than those of the read that replied, and must be applied first."""
    consumer = consumer_of(redis, "w1", settings=SMALL_BATCHES)
    await redis.xgroup_create(STREAM, keys.WORKER_GROUP, id="0", mkstream=True)
    await redis.xadd(STREAM, {ACTION_FIELD: send("s1", 1)})
    batch, missed = await consumer._new()
    assert not missed
    assert len(batch) == 1
    await redis.xadd(STREAM, {ACTION_FIELD: send("s1", 2)})
    # Redis ran a read for w1 but its reply never arrived.
    await redis.xreadgroup(keys.WORKER_GROUP, "w1", {STREAM: ">"}, count=10)
    await redis.xadd(STREAM, {ACTION_FIELD: send("s1", 3)})

    assert await consumer._handle(batch, read_ahead=True)

    assert consumer._missed
    assert consumer.ahead == []  # 3 is not applied before 2
    await drain(consumer, redis)
    assert await logged(redis, "s1") == [1, 2, 3]


async def test_leases_taken_before_a_failure_in_the_same_round_are_consumed(
    redis: Redis, redis_url: str
) -> None:
    """Taking leases may fail part way (a node away): those taken before are held and renewed
    from then on, so they must get a consumer too, or their partitions stall for good."""
    settings = load_settings(
        redis_url=redis_url, callback_partitions=4, worker_sleep_seconds=0.05, pod_name="w1"
    )
    worker = Worker(settings)
    await worker.partitions.ensure()  # its SET is not a lease's
    real_set = worker.redis.set
    calls = 0

    async def set_failing_the_third(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RedisConnectionError("node away")
        return await real_set(*args, **kwargs)

    worker.redis.set = set_failing_the_third  # type: ignore[method-assign]
    try:
        with pytest.raises(RedisConnectionError):
            await worker._rebalance()
        assert len(worker.leases.owned) == 2
        assert set(worker.consumers) == worker.leases.owned

        await worker._rebalance()
        assert len(worker.leases.owned) == 4
        assert set(worker.consumers) == worker.leases.owned
    finally:
        for partition in list(worker.consumers):
            await worker._stop_consumer(partition)
        await worker.redis.aclose()


async def test_partitions_free_at_start_are_consumed_at_once_later_ones_after_the_grace(
    redis: Redis, redis_url: str
) -> None:
    """A partition taken over from another worker waits the takeover grace (its previous
    owner may still finish a batch). The first round at start takes only partitions nobody
    held, so it must not wait: but `acquire` set the grace before the round's consumers were
    started with it, and every start (a deploy, a scale from zero) waited up to 3 s."""
    settings = load_settings(
        redis_url=redis_url, callback_partitions=2, worker_sleep_seconds=0.05, pod_name="w1"
    )
    await redis.set(keys.partition_lease(1), "another-worker", px=60_000)
    worker = Worker(settings)
    try:
        await worker._rebalance()
        assert set(worker.consumers) == {0}
        assert worker.consumers[0][0].start_after == 0
        await redis.delete(keys.partition_lease(1))  # its owner is gone
        await worker._rebalance()
        assert set(worker.consumers) == {0, 1}
        assert worker.consumers[1][0].start_after == worker.leases.takeover_grace > 0
    finally:
        for partition in list(worker.consumers):
            await worker._stop_consumer(partition)
        await worker.redis.aclose()


async def test_a_dead_workers_partitions_are_taken_once_its_leases_expired(redis: Redis) -> None:
    """README: a partition whose worker dies is taken over when its lease expires. The live
    count kept a silent worker for three ttls, so the survivor stayed at its old share and
    the dead worker's free partitions waited two more leases."""
    scripts = Scripts(redis)
    await scripts.load()
    alive = PartitionLeases(redis, scripts, "alive", partitions=4, ttl=30.0)
    dead = PartitionLeases(redis, scripts, "dead", partitions=4, ttl=30.0)
    await alive.live_workers()  # both heartbeats in: a share of two each
    await dead.acquire(await dead.live_workers())
    await alive.acquire(await alive.live_workers())
    assert len(dead.owned) == 2
    assert len(alive.owned) == 2
    # `dead` is SIGKILLed: a ttl later its leases have expired and its heartbeat is that old.
    for partition in dead.owned:
        await redis.delete(keys.partition_lease(partition))
    await redis.zadd(keys.WORKER_HEARTBEATS, {"dead": time.time() - 31})
    await alive.acquire(await alive.live_workers())
    assert alive.owned == {0, 1, 2, 3}


async def test_the_worker_fires_the_deadlines_of_all_its_partitions_in_one_pass(
    redis: Redis,
) -> None:
    scripts = Scripts(redis)
    settings = load_settings(callback_partitions=2)
    tasks = TaskStore(redis, scripts, settings)
    schedules = [PartitionSchedule(redis, tasks, partition) for partition in (0, 1)]
    refs = [TaskRef("acme", f"s{p}", f"t{p}") for p in (0, 1)]
    for partition, ref in enumerate(refs):
        await tasks.apply(ref, "create", fields={"status": "processing"})
        member = keys.task_member(ref.tenant_id, ref.session_id, ref.task_id)
        await redis.zadd(keys.partition_deadlines(partition), {member: time.time() - 1})

    await fire_due_all(redis, schedules)

    for partition, ref in enumerate(refs):
        state = await tasks.read(ref)
        assert state is not None
        assert state["status"] == "timed_out"
        assert await redis.zcard(keys.partition_deadlines(partition)) == 0


async def test_the_session_script_without_a_stream_entry_applies_once_per_key(
    redis: Redis,
) -> None:
    """`bench --direct` calls the worker's script with a per-action key and no entry id."""
    scripts = Scripts(redis)
    body = events.event_body(events.MESSAGE, {"n": 1})
    script_keys = [keys.session_dedupe("acme", "s1", "a1"), keys.session_log("acme", "s1")]
    args = [body, 100, 60_000, keys.session_channel("acme", "s1"), 60]
    first = await scripts.session_event(keys=script_keys, args=args)
    again = await scripts.session_event(keys=script_keys, args=args)
    assert first[0] == b"ok"
    assert again == [b"duplicate", b""]
    assert await logged(redis, "s1") == [1]


async def test_a_lease_renewal_answered_with_an_error_is_not_trusted_as_renewed(
    redis: Redis,
) -> None:
    """An error reply for one lease (here a key of the wrong type; on a cluster, the lease's
    node away while the others answer) is not a renewal: counting it as one (an error reply
    is truthy) kept extending the trust in a lease that could expire and be taken by another
    worker, two consumers then applying one partition. Neither lost nor renewed: its trust
    runs out, the other lease is renewed."""
    scripts = Scripts(redis)
    await scripts.load()
    leases = PartitionLeases(redis, scripts, "w1", partitions=2, ttl=30.0)
    await leases.acquire(live=1)
    assert leases.owned == {0, 1}
    trusted = dict(leases.valid_until)
    await redis.delete(keys.partition_lease(1))
    await redis.hset(keys.partition_lease(1), "not", "a lease")  # every command on it fails

    assert await leases.renew() == set()
    assert leases.owned == {0, 1}
    assert leases.valid_until[0] > trusted[0]
    assert leases.valid_until[1] == trusted[1]


async def test_adopting_a_dead_owners_pending_entries_takes_all_and_counts_no_delivery(
    redis: Redis,
) -> None:
    for n in range(5):
        await redis.xadd(STREAM, {ACTION_FIELD: send("s1", n)})
    await redis.xgroup_create(STREAM, keys.WORKER_GROUP, id="0")
    await redis.xreadgroup(keys.WORKER_GROUP, "dead", {STREAM: ">"})

    await adopt(redis, STREAM, keys.WORKER_GROUP, "w1", count=2)  # three pages

    pending = await redis.xpending_range(STREAM, keys.WORKER_GROUP, "-", "+", 10)
    assert [row["consumer"] for row in pending] == [b"w1"] * 5
    assert [row["times_delivered"] for row in pending] == [1] * 5


async def retry_due(redis: Redis) -> tuple[TaskStore, TaskRef, str]:
    """Task t1 of acme/s1 whose attempt 1 failed retryably, its retry due now on partition
    0: the store, the task and its member in the retries set."""
    tasks = TaskStore(redis, Scripts(redis), load_settings(callback_partitions=1))
    ref = TaskRef("acme", "s1", "t1")
    action = ChatProcess(
        tenant_id="acme",
        session_id="s1",
        task_id="t1",
        agent_id="default",
        message="hi",
        user=User(id="alice"),
        callback_queue=keys.callback_stream(0),
        deadline=utcnow() + timedelta(minutes=5),
    )
    created = {"status": "processing", "action": encode_action(action).decode()}
    await tasks.apply(ref, "create", fields=created)
    await tasks.apply(ref, "requeue", attempt=1)  # attempt 1 failed, retryably
    member = keys.task_member("acme", "s1", "t1")
    await redis.zadd(keys.partition_retries(0), {member: time.time() - 1})
    return tasks, ref, member


async def test_a_retry_handed_out_by_a_worker_that_died_before_its_xadd_is_sent_again(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatch moved the task to `processing` and the worker died before the attempt's
    action reached the AES (or the XADD failed). Not yet: a dispatch a moment old may still
    be on its way. Once old enough, the attempt is handed out again, exactly once, with the
    attempt's own action id (the AES sees the same action if the first one did get there)."""
    tasks, ref, _ = await retry_due(redis)
    schedule = PartitionSchedule(redis, tasks, 0)
    died = await tasks.apply(ref, "dispatch", seq=60_000)  # the worker that died
    assert died is not None
    assert died.verdict.value == "ok"

    await fire_due_all(redis, [schedule])  # too soon to tell from one still on its way
    assert await redis.xlen(keys.aes_stream("normal")) == 0
    assert await redis.zcard(keys.partition_retries(0)) == 1

    monkeypatch.setattr("services.worker.schedule.REDISPATCH_MS", 0)
    await fire_due_all(redis, [schedule])
    await fire_due_all(redis, [schedule])  # confirmed: nothing is handed out twice
    [(_, fields)] = await redis.xrange(keys.aes_stream("normal"))
    sent = decode_action(fields[ACTION_FIELD.encode()])
    assert isinstance(sent, ChatProcess)
    assert (sent.attempt, sent.action_id) == (2, "t1-a2")
    assert await redis.zcard(keys.partition_retries(0)) == 0
    state = await tasks.read(ref)
    assert state is not None
    assert (state["status"], state["attempt"]) == ("processing", "2")
    assert "dispatched_ms" not in state


async def test_a_retry_set_again_while_its_attempt_was_handed_out_is_kept(redis: Redis) -> None:
    """Attempt 2 is handed out and fails at once: its requeue sets the task's retry member
    again (attempt 3, later) before the firing worker removes the member it fired. That new
    retry stays; a plain ZREM removed it and the task waited for its deadline."""
    tasks, _, member = await retry_due(redis)
    retries = keys.partition_retries(0)

    class FailsAtOnce(PartitionSchedule):
        async def _enqueue_attempt(self, ref: TaskRef, stored: str) -> None:
            await super()._enqueue_attempt(ref, stored)
            # The AES failed attempt 2 at once; the callback loop requeued it and scheduled
            # attempt 3 (`queue_acks`), all before this firing finished.
            await tasks.apply(ref, "requeue", attempt=2)
            await redis.zadd(retries, {member: time.time() + 60})

    await fire_due_all(redis, [FailsAtOnce(redis, tasks, 0)])

    assert await redis.xlen(keys.aes_stream("normal")) == 1  # attempt 2 went out
    due = await redis.zscore(retries, member)
    assert due is not None, "attempt 3's retry was removed with the fired one"
    assert due > time.time()


async def test_stream_lag_counts_unread_entries_when_redis_cannot_tell(
    redis: Redis, redis_url: str
) -> None:
    """After an entry past the group's position is deleted, XINFO GROUPS reports no lag; the
    gauge showed 0 (no backlog for the autoscaler or the alert) instead of the unread ones."""
    stream = keys.callback_stream(0)
    await redis.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
    ids = [await redis.xadd(stream, {ACTION_FIELD: b"{}"}) for _ in range(4)]
    await redis.xreadgroup(keys.WORKER_GROUP, "w1", {stream: ">"}, count=1)
    await redis.xdel(stream, ids[2])
    [group] = await redis.xinfo_groups(stream)
    assert group["lag"] is None  # what Redis says here

    assert await sampled_lag(redis_url, stream) == 2  # the second and the fourth entry


async def test_the_worker_rides_through_redis_refusing_writes(redis_url: str, redis: Redis) -> None:
    """A primary demoted under the worker (a failover caught mid-way) answers writes with
    READONLY; the worker's lease round used to raise it out of `run()`: the process ended."""
    settings = load_settings(
        redis_url=redis_url, callback_partitions=1, partition_lease_seconds=1.5
    )
    worker = Worker(settings)
    running = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(10):
            while not worker.leases.owned:  # the worker took its partition
                await asyncio.sleep(0.02)
        await redis.execute_command("REPLICAOF", "127.0.0.1", "1")  # read-only now
        try:
            async with asyncio.timeout(10):
                while not await _refused_a_write(redis):
                    await asyncio.sleep(0.02)
            await asyncio.sleep(2 * worker.settings.partition_lease_seconds / 3)  # rounds
            assert not running.done(), running.exception()
        finally:
            await redis.execute_command("REPLICAOF", "NO", "ONE")
    finally:
        worker.stopping.set()
        await asyncio.wait_for(running, 15)


async def _refused_a_write(redis: Redis) -> bool:
    try:
        await redis.set("probe", "1")
    except Exception:
        return True
    return False


@pytest.mark.parametrize(
    ("tokens_used", "counted"),
    [
        ({"input": 30, "output": 12, "total": 42}, 42),
        ({"total": 42}, 42),  # a seed-era AES that reports the total only
        ({"input": 30, "output": 12}, 42),
        (None, 0),
    ],
)
async def test_the_seeds_completion_is_answered_and_its_tokens_counted(
    redis: Redis, tokens_used: dict[str, int] | None, counted: int
) -> None:
    """DESIGN: the worker accepts the seed's `execution.callback` as `execution.completed`.
    Its `tokens_used {input, output, total}` counts towards the tenant's daily budget; a
    callback reporting only `total` counted 0, so such a tenant never reached its budget."""
    ref = TaskRef("acme", "s1", "t1")
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    await tasks.apply(ref, "create", fields={"status": "processing"})
    legacy: dict[str, Any] = {
        "action_type": "execution.callback",
        "task_id": "t1",
        "tenant_id": "acme",
        "session_id": "s1",
        "status": "completed",
        "result": {"response": "done"},
    }
    if tokens_used is not None:
        legacy["tokens_used"] = tokens_used
    await redis.xadd(STREAM, {ACTION_FIELD: json.dumps(legacy)})
    consumer = consumer_of(redis, "w1")
    await consumer.effects.scripts.load()
    await redis.xgroup_create(STREAM, keys.WORKER_GROUP, id="0", mkstream=True)
    batch, _ = await consumer._new()
    assert await consumer._handle(batch)
    await consumer._flush_acks()
    state = await tasks.read(ref)
    assert state is not None
    assert state["status"] == "completed"
    usage = await UsageCounter(redis).today("acme")
    assert (usage.tokens, usage.tasks) == (counted, 1)


async def _run_through_a_broken_log(redis: Redis, log: str, entries: int) -> None:
    """Run a consumer while the session log is a key of another type (every append fails
    with WRONGTYPE) until each of the `entries` was tried twice, then repair the key (an
    operator deletes it) and run until nothing is pending: what is still pending applies."""
    settings = load_settings(
        worker_sleep_seconds=0.05, callback_partitions=1, max_delivery_attempts=5
    )
    scripts = Scripts(redis)
    tasks = TaskStore(redis, scripts, settings)
    effects = CallbackEffects(tasks, scripts, settings)
    consumer = PartitionConsumer(redis, effects, tasks, settings, "w1", 0, TenantLabels(5))
    running = asyncio.create_task(consumer.run())
    try:
        async with asyncio.timeout(15):
            while True:  # delivery counts are in Redis: nothing to wait on
                await asyncio.sleep(0.02)
                pending = await redis.xpending_range(STREAM, keys.WORKER_GROUP, "-", "+", 10)
                tried = [p["times_delivered"] for p in pending]
                if len(tried) == entries and min(tried) >= 2:
                    break
            await redis.delete(log)
            while True:
                await asyncio.sleep(0.02)
                groups = await redis.xinfo_groups(STREAM)
                if groups[0]["pending"] == 0 and groups[0]["lag"] == 0:
                    break
    finally:
        consumer.stop()
        await running
    assert await redis.xlen(keys.DEAD_LETTERS) == 0


def _frames(entries: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(b"{" + fields[b"e"]) for _, fields in entries]


async def test_a_send_whose_log_append_failed_is_applied_once_the_log_is_repaired(
    redis: Redis,
) -> None:
    """Redis does not undo a script that fails part way: session_event.lua set the session's
    applied mark before the XADD that failed, so the retry took the send for a duplicate and
    acknowledged it, neither delivered nor dead-lettered."""
    log = keys.session_log("acme", "s1")
    await redis.set(log, "a key of the wrong type")
    send = WebsocketSend(tenant_id="acme", session_id="s1", message={"n": 1})
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(send)})
    await _run_through_a_broken_log(redis, log, entries=1)
    assert [f["data"] for f in _frames(await redis.xrange(log))] == [{"n": 1}]


async def test_a_chunk_and_completion_whose_log_append_failed_are_not_lost(
    redis: Redis,
) -> None:
    """task_event.lua moved the task (last_seq, status) before the XADD that failed: the retry
    found the chunk a duplicate and the task final, and the client never got either event."""
    ref = TaskRef("acme", "s2", "t1")
    tasks = TaskStore(redis, Scripts(redis), SETTINGS)
    await tasks.apply(ref, "create", fields={"status": "processing"})
    log = keys.session_log("acme", "s2")
    await redis.delete(log)
    await redis.set(log, "a key of the wrong type")
    chunk = ExecutionChunk(
        attempt=1, tenant_id="acme", session_id="s2", task_id="t1", seq=1, delta="hi"
    )
    done = ExecutionCompleted(
        attempt=1, tenant_id="acme", session_id="s2", task_id="t1", content="hi"
    )
    for action in (chunk, done):
        await redis.xadd(STREAM, {ACTION_FIELD: encode_action(action)})
    await _run_through_a_broken_log(redis, log, entries=2)
    assert [f["type"] for f in _frames(await redis.xrange(log))] == [
        events.CHAT_CHUNK,
        events.CHAT_RESPONSE,
    ]
    state = await tasks.read(ref)
    assert state is not None
    assert (state["status"], state["last_seq"]) == ("completed", "1")
    assert state["final_event_id"] == (await redis.xrange(log))[-1][0].decode()


async def test_a_callback_redis_refuses_for_a_while_is_applied_not_dead_lettered(
    redis: Redis,
) -> None:
    """Out of memory (or a demoted primary) refuses every effect for as long as it lasts; those
    refusals counted as the entry's failures, and a healthy send or completion was
    dead-lettered after MAX_DELIVERY_ATTEMPTS of them."""
    settings = load_settings(
        worker_sleep_seconds=0.05, callback_partitions=1, max_delivery_attempts=2
    )
    send = WebsocketSend(tenant_id="acme", session_id="s1", message={"n": 1})
    await redis.xadd(STREAM, {ACTION_FIELD: encode_action(send)})
    await redis.xgroup_create(STREAM, keys.WORKER_GROUP, id="0")
    await redis.config_set("maxmemory", "1")  # every write that needs memory is refused
    consumer = consumer_of(redis, "w1", settings=settings)
    running = asyncio.create_task(consumer.run())
    try:
        async with asyncio.timeout(15):
            while True:  # delivery counts are in Redis: nothing to wait on
                await asyncio.sleep(0.02)
                pending = await redis.xpending_range(STREAM, keys.WORKER_GROUP, "-", "+", 1)
                if pending and pending[0]["times_delivered"] > settings.max_delivery_attempts:
                    break
    finally:
        await redis.config_set("maxmemory", "0")
    try:
        async with asyncio.timeout(15):
            while (await redis.xinfo_groups(STREAM))[0]["pending"]:
                await asyncio.sleep(0.02)
    finally:
        consumer.stop()
        await running
    assert await redis.xlen(keys.DEAD_LETTERS) == 0
    assert await logged(redis, "s1") == [1]


async def sampled_lag(redis_url: str, stream: str) -> float | None:
    """The lag a worker owning partition 0 reports for `stream` (its metric)."""
    worker = Worker(load_settings(redis_url=redis_url, callback_partitions=1))
    worker.leases.owned = {0}
    try:
        await worker._sample_lag()
    finally:
        await worker.redis.aclose()
    return REGISTRY.get_sample_value(
        "orchestrator_stream_lag", {"stream": stream, "group": keys.WORKER_GROUP}
    )


async def test_a_release_that_failed_part_way_does_not_stop_the_worker_the_next_round(
    redis: Redis, redis_url: str
) -> None:
    """Two surplus partitions to give back, Redis away at the first release: both consumers
    were stopped, the second partition stayed owned, and the next round stopped its consumer
    again: KeyError, the worker process died (seen on a Sentinel failover and a cluster node
    restart in CI)."""
    settings = load_settings(
        redis_url=redis_url, callback_partitions=4, worker_sleep_seconds=0.05, pod_name="w1"
    )
    worker = Worker(settings)
    try:
        await worker._rebalance()
        assert len(worker.consumers) == 4
        await redis.zadd(keys.WORKER_HEARTBEATS, {"w2": time.time()})  # a second worker
        real_release = worker.leases.release

        async def release_failing_once(partition: int) -> None:
            worker.leases.release = real_release  # type: ignore[method-assign]
            raise RedisConnectionError("primary away")

        worker.leases.release = release_failing_once  # type: ignore[method-assign]
        with pytest.raises(RedisConnectionError):
            await worker._rebalance()
        await worker._rebalance()  # the surplus again: given back now
        assert len(worker.leases.owned) == 2
        assert set(worker.consumers) == worker.leases.owned
    finally:
        worker.stopping.set()
        await worker._stop_consumers(list(worker.consumers))
        await worker.redis.aclose()
        if worker.joint_redis is not None:
            await worker.joint_redis.aclose()

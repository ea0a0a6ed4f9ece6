"""The reference AES (`orchestrator executor`) keeps the contract's promise on real processes:
a healthy run is never reclaimed and run twice (while it waits for a slot, while its
executor drains, after Redis lost the consumer group), and a task past its deadline stops
holding a slot.

"Ran once" is checked once every task answered and nothing is pending, then again after a
window in which a second run, had one been started, would have answered: a run that does
not happen sends no event to wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from services.cli.embedded import RedisServer
from services.cli.stack import LocalStack
from services.core import keys
from services.core.actions import (
    ACTION_FIELD,
    ChatCancel,
    ChatProcess,
    ExecutionCompleted,
    User,
    decode_action,
    encode_action,
)
from services.core.ids import new_id
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from services.core.streams import Entry
from services.executor.main import Executor
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, new_stack

pytestmark = pytest.mark.e2e

CALLBACKS = keys.callback_stream(0)
WAIT_SECONDS = 30.0


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A Redis of its own: these tests read the AES group's pending list whole."""
    own = RedisServer().start()
    yield own
    own.cleanup()


@pytest.fixture
async def redis(server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(server.url)
    yield client
    await client.aclose()


@contextmanager
def executors(server: RedisServer, log_dir: Path, **settings: str) -> Iterator[LocalStack]:
    stack = LocalStack.for_redis(server.url, log_dir=log_dir, **settings)
    try:
        stack.start("executor")
        yield stack
    finally:
        stack.stop()


def action(delay_ms: int, priority: str = "normal") -> ChatProcess:
    return ChatProcess(
        tenant_id="acme",
        session_id="s1",
        task_id=new_id(),
        agent_id="default",
        message="hello",
        user=User(id="u1"),
        callback_queue=CALLBACKS,
        context={"simulate": {"delay_ms": delay_ms}},
        priority=priority,  # type: ignore[arg-type]
        deadline=datetime.now(UTC) + timedelta(minutes=5),
    )


async def add(redis: Redis, chat: ChatProcess) -> str:
    entry_id = await redis.xadd(keys.aes_stream(chat.priority), {ACTION_FIELD: encode_action(chat)})
    return entry_id.decode()


async def runs(redis: Redis) -> Counter[str]:
    """`execution.completed` callbacks per task: one per run."""
    seen: Counter[str] = Counter()
    for _, fields in await redis.xrange(CALLBACKS):
        answer = decode_action(fields[ACTION_FIELD.encode()])
        if isinstance(answer, ExecutionCompleted):
            seen[answer.task_id] += 1
    return seen


async def pending(redis: Redis) -> int:
    total = 0
    for stream in (keys.aes_stream(p) for p in keys.PRIORITIES):
        try:
            total += int((await redis.xpending(stream, keys.AES_GROUP))["pending"])
        except ResponseError:  # no group yet
            continue
    return total


async def until(check: Callable[[], Awaitable[Any]], what: str) -> None:
    async with asyncio.timeout(WAIT_SECONDS):
        while not await check():
            await asyncio.sleep(0.05)  # Redis state polled: nothing to wait on


async def all_ran(redis: Redis, tasks: list[ChatProcess], window: float) -> Counter[str]:
    """Runs per task: once every task answered and nothing is pending, and `window` seconds
    later (long enough for a second run of any of them to answer)."""

    async def settled() -> bool:
        return len(await runs(redis)) == len(tasks) and await pending(redis) == 0

    await until(settled, "every task answered, nothing pending")
    await asyncio.sleep(window)
    return await runs(redis)


async def groups(redis: Redis) -> None:
    for stream in (keys.aes_stream(p) for p in keys.PRIORITIES):
        await redis.xgroup_create(stream, keys.AES_GROUP, id="0", mkstream=True)


async def test_entries_of_a_dead_executor_taken_over_run_once_each(
    server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """Three entries left by a dead instance, one slot: the two waiting for it kept their
    claims fresh (they were reclaimed again and run twice)."""
    await groups(redis)
    tasks = [action(1500) for _ in range(3)]
    for chat in tasks:
        await add(redis, chat)
    await redis.xreadgroup(keys.AES_GROUP, "dead", {keys.aes_stream("normal"): ">"}, count=10)
    await asyncio.sleep(1.1)  # idle past the reclaim threshold below: nothing to await
    with executors(server, tmp_path, executor_concurrency="1", executor_reclaim_idle_seconds="1"):
        seen = await all_ran(redis, tasks, window=3.5)
    assert dict(seen) == {chat.task_id: 1 for chat in tasks}


async def test_a_busy_executor_runs_what_one_read_gave_it_once_each(
    server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """An idle executor's blocking read over the three priority streams returns up to `free`
    entries from each: three arriving at the same instant (one transaction) give a one-slot
    executor two it cannot start yet, which wait for the slot, claimed and refreshed (they
    were taken again)."""
    await groups(redis)
    tasks = [action(1500, priority) for priority in keys.PRIORITIES]
    with executors(server, tmp_path, executor_concurrency="1", executor_reclaim_idle_seconds="1"):
        await until(lambda: blocked_readers(redis), "the executor waiting for actions")
        async with redis.pipeline(transaction=True) as together:
            for chat in tasks:
                together.xadd(keys.aes_stream(chat.priority), {ACTION_FIELD: encode_action(chat)})
            await together.execute()
        seen = await all_ran(redis, tasks, window=3.5)
    assert dict(seen) == {chat.task_id: 1 for chat in tasks}


async def blocked_readers(redis: Redis) -> bool:
    clients = await redis.client_list()
    return any(
        client.get("cmd") == "xreadgroup" and client.get("flags") == "b" for client in clients
    )


async def test_a_backlog_of_high_is_served_before_the_low_backlog(
    server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """One slot, 4 low then 4 high actions queued before the executor starts: every high one
    runs first. A multi-stream read takes `free` entries of *each* stream: the executor
    served high, low, high, low (the low entry read with each high one ran next)."""
    await groups(redis)
    lows = [action(150, "low") for _ in range(4)]
    highs = [action(150, "high") for _ in range(4)]
    for chat in lows + highs:
        await add(redis, chat)
    with executors(server, tmp_path, executor_concurrency="1"):
        await until(lambda: answered(redis, 8), "every task answered")
    label = {chat.task_id: chat.priority for chat in lows + highs}
    assert [label[task] for task in await completion_order(redis)] == ["high"] * 4 + ["low"] * 4


async def completion_order(redis: Redis) -> list[str]:
    return [
        answer.task_id
        for _, fields in await redis.xrange(CALLBACKS)
        if isinstance(answer := decode_action(fields[ACTION_FIELD.encode()]), ExecutionCompleted)
    ]


async def answered(redis: Redis, count: int) -> bool:
    return len(await completion_order(redis)) >= count


async def test_an_executor_holds_no_action_it_cannot_start_so_an_idle_peer_takes_it(
    server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """Three long actions (one per priority) queued, a one-slot executor: it read one of each
    and kept the two it could not run claimed for as long as its first run took, while a
    second executor, idle, got nothing. It holds one now, and the peer runs the next."""
    await groups(redis)
    tasks = [action(6000, priority) for priority in keys.PRIORITIES]
    for chat in tasks:
        await add(redis, chat)
    with executors(server, tmp_path, executor_concurrency="1") as stack:
        await until(lambda: pending(redis), "the first executor running a task")
        assert await pending(redis) == 1  # one read took all three before
        stack.start("executor", executor_concurrency="1")

        async def both_running() -> bool:
            return await pending(redis) == 2

        await until(both_running, "the idle executor running the next task")
        assert not await completion_order(redis)  # at the same time as the first one
        stack.stop()


async def test_a_draining_executor_keeps_its_claims_until_its_tasks_end(
    server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """SIGTERM with a task running: it finishes within the drain window while a peer runs;
    the claim refresher stopped first and the peer reclaimed the task and ran it again."""
    chat = action(4000)
    with executors(
        server, tmp_path, drain_seconds="10", executor_reclaim_idle_seconds="2"
    ) as stack:
        await add(redis, chat)
        await until(lambda: pending(redis), "the task running")
        draining = stack.children[0]
        stack.start("executor")  # a rolling update's new instance
        draining.process.send_signal(signal.SIGTERM)
        seen = await all_ran(redis, [chat], window=4.5)
        assert await asyncio.to_thread(draining.process.wait, 15) == 0
    assert seen[chat.task_id] == 1


async def test_the_claim_refresher_survives_redis_losing_the_group(
    server: RedisServer, redis: Redis
) -> None:
    """Redis lost its data (the group with it) while entries are in hand: the refresher's
    XCLAIM fails with NOGROUP. It died of it, silently, and no claim was refreshed again
    (every later long run became reclaimable, and ran twice)."""
    executor = Executor(load_settings(redis_url=server.url, executor_reclaim_idle_seconds=1))
    stream = keys.aes_stream("normal")
    run = asyncio.create_task(asyncio.Event().wait())  # a task running: its entry in hand
    executor.running["t1"] = (Entry(stream, "1-0", {}), run)  # Redis has no group now
    refresher = asyncio.create_task(executor._keep_claims_alive())
    try:
        await asyncio.sleep(0.8)  # two refresh rounds (every 1/3 s): a failure ends the task
        assert not refresher.done(), refresher.exception()
        await redis.xgroup_create(stream, keys.AES_GROUP, id="0", mkstream=True)
        entry_id = await redis.xadd(stream, {ACTION_FIELD: b"{}"})
        await redis.xreadgroup(keys.AES_GROUP, executor.consumer, {stream: ">"})
        executor.running["t1"] = (Entry(stream, entry_id.decode(), {}), run)
        await asyncio.sleep(1.2)  # past the reclaim threshold, unless a round reset it

        [row] = await redis.xpending_range(stream, keys.AES_GROUP, "-", "+", 1)
        assert int(row["time_since_delivered"]) < 1000  # never reclaimable
    finally:
        for task in (refresher, run):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await executor.redis.aclose()


async def test_a_timed_out_task_stops_holding_the_executor(
    server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """A run past its deadline: the client gets `timed_out`, the worker sends the AES a
    `chat.cancel` and the executor stops at the deadline anyway; the session's next message,
    on the one slot, is answered (it timed out behind the abandoned run)."""
    stack = new_stack(server, tmp_path, executor_concurrency="1", **FAST_EXECUTOR)
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        tenant, session = unique("t"), unique("s")
        await QuotaStore(redis, load_settings()).set(tenant, "pro", {"taskTimeoutSeconds": 2})
        ws, _ = await connect(api.ws_url, tenant, session)
        async with httpx.AsyncClient() as http:
            body = {"message": "long", "session_id": session}
            slow = await send(
                http, api.url, tenant, {**body, "context": {"simulate": {"delay_ms": 30_000}}}
            )
            events = await events_until(ws, final_of(slow.json()["task_id"]), timeout=15)
            assert events[-1]["data"]["code"] == "timed_out"
            quick = await send(http, api.url, tenant, {"message": "quick", "session_id": session})
            events = await events_until(ws, final_of(quick.json()["task_id"]), timeout=15)
        await ws.close()
        notices = await redis.xrange(keys.CANCEL_STREAM)
        assert [decode_action(f[ACTION_FIELD.encode()]).task_id for _, f in notices] == [
            slow.json()["task_id"]
        ]
    finally:
        stack.stop()
    assert events[-1]["type"] == "chat.response"


async def test_an_executor_started_after_a_cancel_does_not_run_the_task(
    server: RedisServer, redis: Redis, tmp_path: Path
) -> None:
    """The task was cancelled while no executor was reading (the one running it died): the
    entry is reclaimed by an executor started afterwards, which reads the cancel stream from
    its start (it read from `$` and ran the task)."""
    chat = action(0)
    notice = ChatCancel(tenant_id="acme", session_id="s1", task_id=chat.task_id)
    await redis.xadd(keys.CANCEL_STREAM, {ACTION_FIELD: encode_action(notice)})
    with executors(server, tmp_path, executor_reclaim_idle_seconds="1"):
        await add(redis, chat)
        await until(lambda: redis.exists(keys.aes_stream("normal")), "the action added")

        async def acknowledged() -> bool:
            groups = await redis.xinfo_groups(keys.aes_stream("normal"))
            return bool(groups) and groups[0]["pending"] == 0 and groups[0]["lag"] == 0

        await until(acknowledged, "the action read and acknowledged")
    assert await runs(redis) == Counter()

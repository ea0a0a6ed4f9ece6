"""`orchestrator executor`: the reference Agent Execution Service, a real consumer of the contract.

It reads `chat.process` from the three priority streams with the `aes` consumer group (high
first), runs the simulated agent, answers on the action's `callback_queue`, and acknowledges
the entry only after the final callback is written. While a task runs its claim is refreshed,
so a long healthy run is never reclaimed; entries of a dead executor are reclaimed after
`ORCHESTRATOR_EXECUTOR_RECLAIM_IDLE_SECONDS`. Cancels arrive on the cancel stream, which every
executor reads in full (no group), so whichever executor runs the task stops it; the worker
sends one too when a task times out. An action past its `deadline` is not started, and a run
still going at the deadline is stopped: its task is over, nobody would take the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import KeyT, StreamIdT

from services.core import clock, keys, telemetry
from services.core.actions import (
    ACTION_FIELD,
    ChatCancel,
    ChatProcess,
    ExecutionChunk,
    ExecutionCompleted,
    ExecutionFailed,
    MalformedAction,
    Usage,
    decode_action,
    encode_action,
)
from services.core.heap import freeze_startup_heap
from services.core.lean_pipeline import run_pipeline
from services.core.listening import serve_metrics
from services.core.logs import log_context
from services.core.metric_buckets import LATENCY_BUCKETS
from services.core.redis_client import (
    COMMAND_TIMEOUT_SECONDS,
    REDIS_DOWN,
    REDIS_REFUSING,
    create_redis,
    is_cluster,
)
from services.core.settings import Settings, process_name
from services.core.streams import (
    GONE_CONSUMER_IDLE_SECONDS,
    Entry,
    dead_letter,
    ensure_group,
    forget_consumers,
    is_missing_group,
    parse_read,
    reclaim,
)
from services.core.task_metrics import create_series
from services.core.task_stop import cancel_and_wait
from services.executor.agent import Simulation, chunks_of, reply_for, usage_for

log = logging.getLogger(__name__)

# First and longest pause before a task Redis failed under is answered again.
OUTAGE_RETRY_SECONDS = (0.1, 2.0)
# Redis not answering, or answering but refusing writes (out of memory, a failed snapshot,
# no replica in sync, a demoted primary): both end by themselves, both are waited out.
REDIS_UNUSABLE = (*REDIS_DOWN, *REDIS_REFUSING)

executions = Counter("orchestrator_executor_tasks", "Tasks run by the executor", ["outcome"])
EXECUTION_OUTCOMES = ("completed", "failed", "expired", "cancelled", "interrupted", "error")
queue_wait = Histogram(
    "orchestrator_queue_wait_seconds",
    "From accepting a message to an executor starting on it",
    ["priority"],
    buckets=LATENCY_BUCKETS,
)

_READ_BY_PRIORITY = (files("services.core") / "lua" / "read_by_priority.lua").read_text()
PRIORITY_RANK = {keys.aes_stream(p): rank for rank, p in enumerate(keys.PRIORITIES)}
REMEMBERED_CANCELS = 10_000
CALLBACK_MAXLEN = 1_000_000

Callback = ExecutionChunk | ExecutionCompleted | ExecutionFailed


class Executor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumer = process_name(settings)
        self.redis: Redis = create_redis(
            settings, max_connections=settings.executor_concurrency + 8
        )
        self.streams = [keys.aes_stream(p) for p in keys.PRIORITIES]
        self.running: dict[str, tuple[Entry, asyncio.Task[None]]] = {}
        self.cancelled: OrderedDict[str, None] = OrderedDict()
        self.waiting: list[Entry] = []
        self.slot_free = asyncio.Event()
        self._by_priority = self.redis.register_script(_READ_BY_PRIORITY)
        # Whether the last read found the streams empty (so the next one may block): until
        # then entries may be queued in more than one stream, and only a read that takes the
        # higher streams first may run.
        self._drained = False
        self._cancels_read = "$"  # the cancel stream's last id read
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        await self._prepare()
        with contextlib.suppress(*REDIS_UNUSABLE):
            await clock.sync(self.redis)  # deadlines were set on Redis's clock by the api
        helpers = [
            asyncio.create_task(_supervised("cancel listener", self._listen_for_cancels)),
            asyncio.create_task(_supervised("claim refresher", self._keep_claims_alive)),
            asyncio.create_task(clock.keep_synced(self.redis)),
        ]
        log.info("executor %s started", self.consumer)
        try:
            await self._consume()
        finally:
            # Drain first: while running tasks finish, their claims must stay fresh (or
            # another executor takes them over and runs them twice) and cancels must reach them.
            await self._finish_running()
            for helper in helpers:
                helper.cancel()
            with contextlib.suppress(*REDIS_UNUSABLE, ResponseError):
                for stream in self.streams:  # what it still holds keeps it (reclaimed later)
                    await forget_consumers(self.redis, stream, keys.AES_GROUP, only=self.consumer)
            await self.redis.aclose()

    async def _prepare(self) -> None:
        """The groups, and the cancels already there, before the first action is read: an
        executor started now may reclaim the entry of a task cancelled before it started (the
        executor running it died; the stream keeps the last CANCEL_STREAM_MAXLEN notices).
        Redis unusable at start is waited for, as at any time later."""
        while not self.stopping.is_set():
            try:
                await self._make_groups()
                self._cancels_read = await self._take_cancels("0-0", block=None)
                return
            except REDIS_UNUSABLE as exc:
                log.warning("executor: redis unavailable at start (%s)", exc)
                await self._pause()

    async def _make_groups(self) -> None:
        for stream in self.streams:
            await ensure_group(self.redis, stream, keys.AES_GROUP)

    async def _pause(self, seconds: float = 0.5) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _consume(self) -> None:
        reclaim_every = self.settings.executor_reclaim_idle_seconds / 2
        loop = asyncio.get_running_loop()
        next_reclaim = 0.0
        while not self.stopping.is_set():
            try:
                if loop.time() >= next_reclaim:
                    await self._reclaim_from_dead_executors()
                    next_reclaim = loop.time() + reclaim_every
                free = self.settings.executor_concurrency - len(self.running)
                if free <= 0:
                    self.slot_free.clear()
                    self._drained = False  # a backlog may build while every slot is busy
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.slot_free.wait(), 1.0)
                    continue
                if not self.waiting:
                    self.waiting.extend(await self._take(free))
                self.waiting.sort(key=lambda e: (PRIORITY_RANK.get(e.stream, 9), e.id))
                started = False
                while self.waiting and len(self.running) < self.settings.executor_concurrency:
                    started = await self._start(self.waiting.pop(0)) or started
                if started:
                    # Let the new tasks send their answers before the next read is sent: an
                    # answer is the next hop of a message, the read only waits for new ones.
                    await asyncio.sleep(0)
            except REDIS_UNUSABLE as exc:
                log.warning("executor: redis unavailable (%s)", exc)
                await self._pause()
            except ResponseError as exc:
                if not is_missing_group(exc):
                    raise
                log.warning("executor: consumer groups missing, recreating")
                try:
                    await self._make_groups()
                except REDIS_UNUSABLE as again:  # recreated on the next NOGROUP
                    log.warning("executor: groups not recreated, redis unavailable (%s)", again)
                    await self._pause()

    async def _take(self, free: int) -> list[Entry]:
        """At most `free` new actions, high priority first, so that nothing is held that
        this executor cannot start (an idle peer takes it). While the streams may hold a
        backlog, one script reads them in priority order without waiting; once they were
        found empty, a blocking read of all three waits for the next action (it takes at
        most `free` of each stream: more only when several arrive at the same instant)."""
        if self._drained:
            entries = parse_read(await self._read(free))
        else:
            entries = parse_read(
                await self._by_priority(
                    keys=self.streams, args=[keys.AES_GROUP, self.consumer, free]
                )
            )
        self._drained = len(entries) < free
        return entries

    async def _read(self, count: int) -> Any:
        """Up to `count` new actions of each stream, waiting for one up to the
        configured sleep. On one server without redis-py's machinery around the round trip
        (`run_pipeline`): most of an idle executor's CPU per message was there. Entries a lost
        reply delivered stay pending and are reclaimed like those of a dead executor."""
        block_ms = int(self.settings.worker_sleep_seconds * 1000)
        streams: dict[KeyT, StreamIdT] = dict.fromkeys(self.streams, ">")
        if is_cluster(self.redis):
            return await self.redis.xreadgroup(
                keys.AES_GROUP, self.consumer, streams, count=count, block=block_ms
            )
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xreadgroup(keys.AES_GROUP, self.consumer, streams, count=count, block=block_ms)
            (reply,) = await run_pipeline(pipe, within=block_ms / 1000 + COMMAND_TIMEOUT_SECONDS)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _in_hand(self) -> set[tuple[str, str]]:
        """(stream, id) of every entry this executor holds: running or waiting for a slot."""
        held = {(entry.stream, entry.id) for entry, _ in self.running.values()}
        return held | {(entry.stream, entry.id) for entry in self.waiting}

    async def _reclaim_from_dead_executors(self) -> None:
        idle_ms = int(self.settings.executor_reclaim_idle_seconds * 1000)
        for stream in self.streams:
            claimed = await reclaim(self.redis, stream, keys.AES_GROUP, self.consumer, idle_ms)
            await forget_consumers(
                self.redis,
                stream,
                keys.AES_GROUP,
                keep=self.consumer,
                idle_seconds=GONE_CONSUMER_IDLE_SECONDS,
            )
            held = self._in_hand()  # ours already (ids repeat across the three streams)
            self.waiting.extend(e for e in claimed if (e.stream, e.id) not in held)

    async def _start(self, entry: Entry) -> bool:
        """Start running `entry`'s action; False when it needed no task (malformed, or its
        task was cancelled)."""
        raw = entry.raw_action
        try:
            if raw is None:
                raise MalformedAction("stream entry has no 'action' field")
            action = decode_action(raw)
            if not isinstance(action, ChatProcess):
                raise MalformedAction(f"expected chat.process, got {type(action).__name__}")
        except MalformedAction as exc:
            await dead_letter(self.redis, entry, keys.AES_GROUP, f"malformed action: {exc.reason}")
            return False
        if action.task_id in self.cancelled:
            await self.redis.xack(entry.stream, keys.AES_GROUP, entry.id)
            executions.labels("cancelled").inc()
            return False
        if _deadline(action) <= clock.utcnow():  # timed out while it waited: nobody waits
            await self.redis.xack(entry.stream, keys.AES_GROUP, entry.id)
            executions.labels("expired").inc()
            return False
        running = self.running.get(action.task_id)
        if running is not None and (running[0].stream, running[0].id) == (entry.stream, entry.id):
            return False  # already running here (read again after a reclaim)
        if action.attempt == 1:  # a retry keeps the message's created_at: its wait would
            # include the failed attempt's run and the backoff, observed once per attempt
            waited = (clock.utcnow() - action.created_at).total_seconds()
            queue_wait.labels(action.priority).observe(  # a dot that opens the action's trace
                max(0.0, waited), telemetry.remote_exemplar(action.trace_context)
            )
        task = asyncio.create_task(self._execute(entry, action))
        self.running[action.task_id] = (entry, task)
        return True

    async def _execute(self, entry: Entry, action: ChatProcess) -> None:
        outcome = "completed"
        bound = log_context(
            tenant_id=action.tenant_id, session_id=action.session_id, task_id=action.task_id
        )
        attributes: dict[str, Any] = {
            "orchestrator.task_id": action.task_id,
            "orchestrator.attempt": action.attempt,
        }
        try:
            with (
                bound,
                telemetry.consumer(
                    entry.stream,
                    action.trace_context,
                    message_id=entry.id,
                    group=keys.AES_GROUP,
                    **attributes,
                ) as span,
            ):
                left = (_deadline(action) - clock.utcnow()).total_seconds()
                try:
                    async with asyncio.timeout(max(0.0, left)):
                        outcome = await self._answer_through_outages(action, entry)
                except TimeoutError:
                    outcome = "expired"  # the worker timed the task out: stop, answer nothing
                    await self.redis.xack(entry.stream, keys.AES_GROUP, entry.id)
                except asyncio.CancelledError:
                    # Said before the span ends: it looked like a run that had answered.
                    span.set_attribute("orchestrator.outcome", "cancelled")
                    raise
                span.set_attribute("orchestrator.outcome", outcome)
        except asyncio.CancelledError:
            outcome = "cancelled"
            if action.task_id in self.cancelled:  # cancelled by the client: done with it
                with contextlib.suppress(*REDIS_UNUSABLE):
                    await self.redis.xack(entry.stream, keys.AES_GROUP, entry.id)
        except REDIS_UNUSABLE:
            outcome = "interrupted"  # left pending: reclaimed and run again later
        except Exception as exc:
            outcome = "error"
            await self._fail_run(entry, action, exc)
        finally:
            executions.labels(outcome).inc()
            self.running.pop(action.task_id, None)
            self.slot_free.set()

    async def _fail_run(self, entry: Entry, action: ChatProcess, exc: Exception) -> None:
        """A run that raised what no outage explains (a bug, an input it cannot handle) is
        answered `execution.failed`, not retryable (it would fail the same way), and its entry
        acknowledged. Left pending, it was reclaimed and died again until the task's deadline,
        with the client waiting for nothing."""
        with log_context(
            tenant_id=action.tenant_id, session_id=action.session_id, task_id=action.task_id
        ):
            log.error("executor: the run failed; answering execution.failed", exc_info=exc)
        failure = ExecutionFailed(
            tenant_id=action.tenant_id,
            session_id=action.session_id,
            task_id=action.task_id,
            trace_context=action.trace_context,
            attempt=action.attempt,
            error=f"executor error: {type(exc).__name__}",
            retryable=False,
        )
        try:
            await self._callback(action, failure, done=entry)
        except REDIS_UNUSABLE as again:  # left pending: reclaimed (and answered) later
            log.warning("executor: the failure could not be answered (%s)", again)

    async def _answer_through_outages(self, action: ChatProcess, entry: Entry) -> str:
        """`_answer`, started again here when Redis fails under it (a reset, a silent
        connection, a freeze), until the task's deadline. Left pending instead, the entry
        waited for a reclaim (EXECUTOR_RECLAIM_IDLE_SECONDS, 30-45 s) with the client's answer
        stalled; running it again here is what the reclaim would do (the worker drops the
        chunks it has already applied), while this executor keeps its claim fresh."""
        pause = OUTAGE_RETRY_SECONDS[0]
        while True:
            try:
                return await self._answer(action, entry)  # acknowledges the entry
            except REDIS_UNUSABLE as exc:
                if self.stopping.is_set():
                    raise  # left pending: the next executor reclaims it
                log.warning("executor: redis failed under a task, answering again: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), pause)
            pause = min(pause * 2, OUTAGE_RETRY_SECONDS[1])

    async def _answer(self, action: ChatProcess, entry: Entry) -> str:
        """Answer the action; its last callback acknowledges `entry`."""
        simulation = Simulation.from_context(action.context)
        if simulation.delay_ms:
            await asyncio.sleep(simulation.delay_ms / 1000)
        if simulation.stall:
            await self.stopping.wait()
            raise asyncio.CancelledError
        if action.attempt <= simulation.fail_attempts:
            with telemetry.producer(action.callback_queue) as span:
                telemetry.fail(
                    span,
                    f"simulated failure of attempt {action.attempt}",
                    error_type="execution_failed",
                )
                failure = ExecutionFailed(
                    tenant_id=action.tenant_id,
                    session_id=action.session_id,
                    task_id=action.task_id,
                    trace_context=telemetry.inject(span),
                    attempt=action.attempt,
                    error=f"simulated failure of attempt {action.attempt}",
                    retryable=simulation.retryable,
                )
                await self._callback(action, failure, done=entry)
            return "failed"
        reply = reply_for(action.agent_id, action.message, simulation.repeat)
        unsent: list[Callback] = []  # unpaced chunks: sent with the final callback
        if action.stream:
            unsent = await self._stream(action, reply, simulation)
        input_tokens, output_tokens, cost = usage_for(action.message, reply)
        with telemetry.producer(action.callback_queue) as span:
            completed = ExecutionCompleted(
                tenant_id=action.tenant_id,
                session_id=action.session_id,
                task_id=action.task_id,
                trace_context=telemetry.inject(span),
                attempt=action.attempt,
                content=reply,
                usage=Usage(
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    model="reference-echo-1",
                    cost=cost,
                ),
            )
            await self._callback(action, *unsent, completed, done=entry)
        return "completed"

    async def _stream(
        self, action: ChatProcess, reply: str, simulation: Simulation
    ) -> list[Callback]:
        """The chunks of one answer: one PRODUCER span for the whole stream, not one per chunk.

        Paced chunks are sent one by one; without a delay between them they are returned, to
        travel with the final callback in one round trip (a pipeline keeps their order).
        """
        pace = simulation.chunk_delay_ms
        pace = self.settings.executor_chunk_delay_ms if pace is None else pace
        unsent: list[Callback] = []
        with telemetry.producer(action.callback_queue, **{"orchestrator.stream": True}) as span:
            carrier = telemetry.inject(span)
            chunks = chunks_of(reply)
            for seq, delta in enumerate(chunks, start=1):
                if seq > 1 and pace:
                    await asyncio.sleep(pace / 1000)
                chunk = ExecutionChunk(
                    tenant_id=action.tenant_id,
                    session_id=action.session_id,
                    task_id=action.task_id,
                    trace_context=carrier,
                    attempt=action.attempt,
                    seq=seq,
                    delta=delta,
                )
                if pace:
                    await self._callback(action, chunk)
                else:
                    unsent.append(chunk)
            span.set_attribute("messaging.batch.message_count", len(chunks))
        return unsent

    async def _callback(
        self, action: ChatProcess, *callbacks: Callback, done: Entry | None = None
    ) -> None:
        """Add callbacks to the action's callback stream, in order, in one round trip; with
        `done`, acknowledge that action entry after them (in the same round trip on one
        server: a crash can never leave the answer added and the action unacknowledged)."""
        cluster = is_cluster(self.redis)
        if len(callbacks) == 1 and (done is None or cluster):
            await self.redis.xadd(
                action.callback_queue,
                {ACTION_FIELD: encode_action(callbacks[0])},
                maxlen=CALLBACK_MAXLEN,
                approximate=True,
            )
        else:
            # One slot (the callback partition), so one node and one connection even on a
            # cluster: the entries are added in this order. On one server they are added in
            # one MULTI with the acknowledgement: a worker blocked on the stream is woken once
            # with all of them, instead of with the first entry alone (Redis serves a blocked
            # reader after each command).
            async with self.redis.pipeline(transaction=not cluster) as pipe:
                for callback in callbacks:
                    pipe.xadd(
                        action.callback_queue,
                        {ACTION_FIELD: encode_action(callback)},
                        maxlen=CALLBACK_MAXLEN,
                        approximate=True,
                    )
                if cluster:
                    await pipe.execute()
                else:
                    if done is not None:
                        pipe.xack(done.stream, keys.AES_GROUP, done.id)
                    # Not retried by redis-py: an answer whose reply was lost leaves its
                    # action pending, to be reclaimed and answered again (the worker drops
                    # the second answer of a finished task).
                    for reply in await run_pipeline(pipe, within=COMMAND_TIMEOUT_SECONDS):
                        if isinstance(reply, BaseException):
                            raise reply
        if done is not None and cluster:  # another slot, another node
            await self.redis.xack(done.stream, keys.AES_GROUP, done.id)

    async def _listen_for_cancels(self) -> None:
        while True:
            try:
                self._cancels_read = await self._take_cancels(self._cancels_read, block=1000)
            except REDIS_UNUSABLE:
                await asyncio.sleep(0.5)

    async def _take_cancels(self, after: str, block: int | None) -> str:
        """Apply the cancel notices after `after`; the id of the last one read."""
        reply = await self.redis.xread({keys.CANCEL_STREAM: after}, block=block)
        for entry in parse_read(reply):
            after = entry.id
            try:
                notice = decode_action(entry.raw_action or b"")
            except MalformedAction:
                continue
            if isinstance(notice, ChatCancel):
                self._cancel(notice.task_id)
        return after

    def _cancel(self, task_id: str) -> None:
        self.cancelled[task_id] = None
        while len(self.cancelled) > REMEMBERED_CANCELS:
            self.cancelled.popitem(last=False)
        running = self.running.get(task_id)
        if running is not None:
            running[1].cancel()

    async def _keep_claims_alive(self) -> None:
        """Refresh the claim of every entry in hand, running or waiting for a slot (one read
        can return more than the free slots: up to that many per priority stream), so no
        executor, this one included, reclaims it and runs it twice."""
        interval = self.settings.executor_reclaim_idle_seconds / 3
        while True:
            await asyncio.sleep(interval)
            by_stream: dict[str, list[int | bytes | str | memoryview[int]]] = {}
            for stream, entry_id in self._in_hand():
                by_stream.setdefault(stream, []).append(entry_id)
            for stream, ids in by_stream.items():
                try:
                    await self.redis.xclaim(
                        stream, keys.AES_GROUP, self.consumer, 0, ids, justid=True
                    )
                except REDIS_UNUSABLE:
                    continue
                except ResponseError as exc:  # the group lost with Redis's data: the
                    if not is_missing_group(exc):  # consume loop makes it again
                        raise
                    log.info("executor: consumer group of %s missing; claims not refreshed", stream)

    async def _finish_running(self) -> None:
        """At shutdown, let running tasks finish within the drain window, then stop the rest.

        A stopped task's entry stays pending and is reclaimed by another executor.
        """
        tasks = [task for _, task in self.running.values()]
        if tasks and self.settings.drain_seconds:
            await asyncio.wait(tasks, timeout=self.settings.drain_seconds)
        await cancel_and_wait(*tasks)


def _deadline(action: ChatProcess) -> datetime:
    """The action's deadline; one written without a zone (by hand) is taken as UTC."""
    deadline = action.deadline
    return deadline if deadline.tzinfo is not None else deadline.replace(tzinfo=UTC)


async def _supervised(name: str, work: Callable[[], Awaitable[None]]) -> None:
    """Run a helper loop for the executor's lifetime: one that fails is logged and started
    again, never left dead in silence (a dead claim refresher runs long tasks twice)."""
    while True:
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("executor: %s failed; restarting it", name)
            await asyncio.sleep(1.0)


async def serve(settings: Settings) -> None:
    executor = Executor(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, executor.stopping.set)
    if settings.metrics_port:
        serve_metrics(settings.metrics_port)
    create_series(executions, EXECUTION_OUTCOMES)
    freeze_startup_heap()
    await executor.run()

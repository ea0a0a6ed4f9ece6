"""The consumer loop of one callback partition, read top to bottom.

adopt what the previous owner left pending -> read a batch -> apply all its effects in one
pipelined round trip (acknowledging the previous batch and reading the next one in the same
round trip) -> dead-letter what never will apply.

Under load a batch costs one round trip: its effects go in one pipeline with the
acknowledgement of the previous batch and a (non-blocking) read of the next one. When that
read finds nothing, the next read blocks, with the acknowledgements. Acknowledging what took
effect thus waits for the next pipeline (or for the consumer's stop); a crash in between
redelivers at most one batch, whose effects are idempotent: the task script refuses what it
already applied, and `websocket.send`/`websocket.broadcast` compare the entry id with the
session's (tenant's) mark.
Entries are handled strictly in stream order; a failed batch is retried from the pending list
before anything newer is applied, and a session's later `websocket.send` in the same batch waits
for its failed predecessor (DEFERRED), so one session's events never overtake each other.
Deadlines and retries are fired by the worker for all its partitions at once (`Worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Span, SpanKind
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from services.core import clock, keys, telemetry
from services.core.actions import (
    Callback,
    ExecutionCallback,
    ExecutionChunk,
    ExecutionCompleted,
    ExecutionFailed,
    MalformedAction,
    UnreadableAnswer,
    WebsocketBroadcast,
    WebsocketSend,
    action_type_of,
    decode_callback,
    failure_for_unreadable,
    loose_origin,
    unreadable_answer_task,
)
from services.core.delivery_lag import LagClock
from services.core.logs import log_context
from services.core.redis_client import REDIS_DOWN, REDIS_REFUSING
from services.core.scripts import missing_script
from services.core.settings import Settings
from services.core.streams import (
    Entry,
    adopt,
    dead_letter,
    delivery_counts,
    ensure_group,
    forget_consumers,
    is_missing_group,
    parse_read,
)
from services.core.tasks import Outcome, TaskRef, TaskStore, Verdict, parse_outcome
from services.core.usage import UsageCounter
from services.persistence.records import publish_finished
from services.worker import metrics

if TYPE_CHECKING:
    from services.worker.joint import JointConsumer
from services.worker.callbacks import CallbackEffects, FollowUp, Position, Retry, Spent
from services.worker.schedule import PartitionSchedule, stored_trace

log = logging.getLogger(__name__)

_LAG = LagClock("worker")
# The verdicts whose effect sent the client an event (the answer, a chunk, a retry's status).
_DELIVERED = frozenset({Verdict.ok, Verdict.requeued})


RETRY_PAUSE_SECONDS = 0.5
# The joint loop acknowledges a partition's plain acks once this many are waiting, or once the
# oldest has waited this long (see `PartitionConsumer.queue_acks`).
LAZY_ACKS = 32
LAZY_ACK_SECONDS = 0.2
DEFERRED = "DEFERRED"  # the script's refusal: an earlier event of the session did not apply


def _describe(span: Span, outcome: Outcome, plan: object, action: Callback) -> None:
    """Put what the worker decided on the trace: applied, dropped (and why), retried, or the
    task failed for good (an error there: the client got `chat.error`, and an AES that does
    not trace itself left no other sign of it on the message's trace)."""
    span.set_attribute("orchestrator.verdict", outcome.verdict.value)
    if outcome.verdict in (Verdict.final, Verdict.stale):
        span.add_event(
            "callback dropped",
            {"reason": outcome.verdict.value, "detail": outcome.detail},
        )
    elif isinstance(plan, Retry) and outcome.verdict in (Verdict.ok, Verdict.requeued):
        span.add_event("retry scheduled", {"due": plan.due})
    elif outcome.verdict is Verdict.ok and (failure := _failure_of(action)) is not None:
        telemetry.fail(span, "task failed", error_type=failure)


def _failure_of(action: Callback) -> str | None:
    """The error code of an answer that fails its task (retries aside), None for others."""
    if isinstance(action, ExecutionFailed):
        return action.code
    if isinstance(action, ExecutionCallback) and action.status != "completed":
        return "execution_failed" if action.status == "failed" else "timed_out"
    return None


def _ends_task(action: Callback, plan: object) -> bool:
    """Completions and failures that are not retried end their task."""
    if isinstance(action, ExecutionCompleted | ExecutionCallback):
        return True
    return isinstance(action, ExecutionFailed) and not isinstance(plan, Retry)


def _deferred(result: object) -> bool:
    return isinstance(result, ResponseError) and str(result).startswith(DEFERRED)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _order_key(action: Callback) -> tuple[str, ...] | None:
    """What a callback applied once per stream entry must keep its order within."""
    if isinstance(action, WebsocketSend):
        return ("s", action.tenant_id, action.session_id)
    if isinstance(action, WebsocketBroadcast):
        return ("t", action.tenant_id)
    return None


def _quiet(action: Callback) -> bool:
    """Callbacks whose reply only feeds counters: a chunk, a send, a broadcast."""
    return isinstance(action, ExecutionChunk | WebsocketSend | WebsocketBroadcast)


def _spent_on_the_task(outcome: Outcome) -> bool:
    """Whether a completion's usage counts: applied now, or its task already final, by this
    completion on an earlier delivery that died before counting, or by a cancel or a timeout
    that came while the AES was answering (its tokens were spent all the same: not counting
    them let a client dodge its budget by cancelling at the last chunk). Once per task
    (usage_add.lua's marker). Not a superseded attempt's: the current one counts."""
    return outcome.verdict in (Verdict.ok, Verdict.final)


@dataclass(slots=True)
class Batch:
    """Decoded callbacks of one partition on their way through one round trip."""

    decoded: list[tuple[Entry, Callback]]
    spans: list[Span | None]
    plans: list[FollowUp | None] = field(default_factory=list)
    applied_at: float = 0.0  # when the effects were sent (epoch seconds)

    def quiet(self) -> bool:
        """Whether no reply of the batch is needed soon (see `_queue_read_ahead`)."""
        return all(
            plan is None and _quiet(action)
            for (_, action), plan in zip(self.decoded, self.plans, strict=True)
        )

    def end_spans(self) -> None:
        """End the spans still open (once: a span ended twice is an SDK warning)."""
        for i, span in enumerate(self.spans):
            if span is not None:
                span.end()
                self.spans[i] = None


class PartitionConsumer:
    def __init__(
        self,
        redis: Redis,
        effects: CallbackEffects,
        tasks: TaskStore,
        settings: Settings,
        worker_id: str,
        partition: int,
        tenant_labels: metrics.TenantLabels,
        lease_valid: Callable[[], bool] | None = None,
        start_after: float = 0.0,
        joint: JointConsumer | None = None,
    ) -> None:
        self.redis = redis
        # On a single server, the loop that reads and applies every steady partition at once.
        self.joint = joint
        self.start_after = start_after
        # Whether the partition's lease surely still holds (`PartitionLeases.valid`).
        self._lease_valid = lease_valid or (lambda: True)
        self.effects = effects
        self.settings = settings
        self.consumer = worker_id
        self.partition = partition
        self.stream = keys.callback_stream(partition)
        self.schedule = PartitionSchedule(redis, tasks, partition)
        self.usage = UsageCounter(redis)
        self.tenant_labels = tenant_labels
        self.stopping = asyncio.Event()
        # Reading and applying (its grace after a takeover is over): the worker's timers may fire.
        self.active = False
        # What the last batch applied, acknowledged with the next read (or at stop), and the
        # retries its requeues scheduled (added before those failures are acknowledged).
        self._acks: list[str] = []
        self._acks_since = 0.0  # when the oldest of `_acks` was applied (time.monotonic)
        self._acks_deferred = False
        self._retries: dict[str, float] = {}
        # Usage of completions applied, counted with the acks (before them, in the same round
        # trip: a crash in between redelivers the completion, which counts it again, once).
        self._spent: list[Spent] = []
        # Deadlines of the tasks the last batch ended, removed with the acks: a finished task's
        # deadline would otherwise stay in the partition's sorted set until it fired, only to
        # be refused by the task script (one wasted script call per task, minutes later).
        self._ended: dict[str, list[str]] = {}
        # Deliveries of an entry that did not try it (it waited for its session's failed
        # predecessor, Redis refused writes or had lost its scripts): Redis counted them, and
        # they must not count towards dead-lettering. In memory: a new owner counts them again,
        # which errs on the side of dead-lettering an entry that crashes its workers.
        self._untried: Counter[str] = Counter()
        self.reload_scripts = False
        # The next batch, read with the last batch's effects; and whether that read found our
        # pending list holding something it should not (see `_read_ahead`).
        self.ahead: list[Entry] = []
        self._missed = False

    def stop(self) -> None:
        self.stopping.set()

    def lease_valid(self) -> bool:
        return self._lease_valid()

    async def run(self) -> None:
        if self.start_after:
            # A partition taken over after its lease expired: its previous owner may still be
            # applying the batch it had in hand (a node rejoining, a slow retry); let it end
            # before this consumer applies anything newer.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.start_after)
        while not self.stopping.is_set():
            try:
                await ensure_group(self.redis, self.stream, keys.WORKER_GROUP)
                break
            except (*REDIS_DOWN, *REDIS_REFUSING) as exc:
                log.warning("partition %s: redis unavailable (%s)", self.partition, exc)
                await self._pause()
        self.active = True
        try:
            await self._consume()
        finally:
            self.active = False
            # What the last batch applied: acknowledged now, or redelivered (harmlessly) to
            # whoever consumes the partition next.
            with contextlib.suppress(*REDIS_DOWN, ResponseError):
                await self._flush_acks()
                await forget_consumers(
                    self.redis, self.stream, keys.WORKER_GROUP, only=self.consumer
                )

    async def _consume(self) -> None:
        backlog = True
        while not self.stopping.is_set():
            try:
                if self.reload_scripts:  # Redis lost its scripts (restarted, flushed)
                    self.reload_scripts = False
                    await self.effects.scripts.load()
                if not backlog and self.joint is not None:
                    # Nothing pending that this loop has not applied: read and apply with the
                    # worker's other partitions until something sends us back here.
                    if await self.joint.consume(self):
                        await self._pause()
                    backlog = True
                    continue
                if backlog:
                    self.ahead = []  # pending: read again from there, in order
                    entries = await self._pending()
                    backlog = bool(entries)
                    if not entries:
                        continue
                elif self.ahead:
                    entries, self.ahead = self.ahead, []
                else:
                    entries, missed = await self._new()
                    if missed:
                        # Our pending list holds entries this loop never saw (a read whose
                        # reply was lost): take everything from there, in order.
                        backlog = True
                        continue
                    if not entries:
                        continue
                if not self._lease_valid():
                    # Our lease could not be renewed in time (Redis away): another worker may
                    # own the partition now. Apply nothing until it is renewed (or lost).
                    backlog = True
                    await self._pause()
                    continue
                if not await self._handle(entries, read_ahead=not backlog):
                    backlog = True
                    await self._pause()
                elif self._missed:
                    backlog = True
            except (*REDIS_DOWN, *REDIS_REFUSING) as exc:
                # Refusing writes (out of memory, a failed snapshot, no replica in sync): as
                # an outage, it ends by itself; the pending list is read again then.
                log.warning("partition %s: redis unavailable (%s)", self.partition, exc)
                backlog = True
                await self._pause()
            except ResponseError as exc:
                if not is_missing_group(exc):
                    raise
                log.warning("partition %s: consumer group missing, recreating", self.partition)
                await self._recreate_group()

    async def _recreate_group(self) -> None:
        """The group again; when Redis cannot make it now, the next read (NOGROUP) retries."""
        try:
            await ensure_group(self.redis, self.stream, keys.WORKER_GROUP)
        except (*REDIS_DOWN, *REDIS_REFUSING) as exc:
            log.warning(
                "partition %s: group not recreated, redis unavailable (%s)", self.partition, exc
            )
            await self._pause()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), RETRY_PAUSE_SECONDS)

    async def _pending(self) -> list[Entry]:
        """Our own pending entries, after taking over those of any previous owner."""
        await self._flush_acks()
        await adopt(self.redis, self.stream, keys.WORKER_GROUP, self.consumer)
        # The lease makes this the partition's only reader: earlier owners, their entries
        # just adopted, are gone from the group (a crashed one never left by itself).
        await forget_consumers(self.redis, self.stream, keys.WORKER_GROUP, keep=self.consumer)
        reply = await self.redis.xreadgroup(
            keys.WORKER_GROUP,
            self.consumer,
            {self.stream: "0"},
            count=self.settings.worker_batch_size,
        )
        return parse_read(reply)

    async def _new(self) -> tuple[list[Entry], bool]:
        """Acknowledge the last batch and read the next one, in one round trip (the stream,
        its group and the retries share the partition's slot).

        Also whether our pending list held anything once the last batch was acknowledged: here
        it holds nothing else, unless the reply of an earlier read was lost (a connection
        dropped after Redis ran it, and the command retried).
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            acks = self.queue_acks(pipe)
            self._queue_read(pipe, block=True)
            results = await pipe.execute(raise_on_error=False)
        self.acked(results[:acks])
        for result in results[acks:]:
            if isinstance(result, BaseException):
                raise result
        return parse_read(results[-1]), bool(results[-2])

    def _queue_read(self, pipe: Pipeline, block: bool) -> None:
        """Our oldest pending entry (once the acks queued before have run), then a read."""
        pipe.xpending_range(self.stream, keys.WORKER_GROUP, "-", "+", 1, consumername=self.consumer)
        self._queue_xreadgroup(pipe, block)

    def _queue_xreadgroup(self, pipe: Pipeline, block: bool) -> None:
        pipe.xreadgroup(
            keys.WORKER_GROUP,
            self.consumer,
            {self.stream: ">"},
            count=self.settings.worker_batch_size,
            block=int(self.settings.worker_sleep_seconds * 1000) if block else None,
        )

    def _queue_read_ahead(self, pipe: Pipeline, applying: int, block: bool) -> None:
        """A read, then our pending list as it is after it (see `_read_ahead`).

        The read blocks (until the next entry arrives) when nothing in the batch needs its
        reply soon: a batch of chunks and sends only feeds counters and the acks, which wait
        for the next pipeline anyway. Its effects still run at once (Redis runs a pipeline's
        commands in order; only the replies wait), and the worker then needs one round trip
        per batch instead of two (the effects, then a blocking read) when the load is light.
        """
        self._queue_xreadgroup(pipe, block=block)
        pipe.xpending_range(
            self.stream,
            keys.WORKER_GROUP,
            "-",
            "+",
            applying + self.settings.worker_batch_size + 1,
            consumername=self.consumer,
        )

    def _read_ahead(self, results: list[Any], applying: list[str]) -> None:
        """Take the acks and the read queued after a batch's effects (see `_apply`).

        Our pending list must then hold exactly the batch being applied (`applying`) and what
        the read returned. Anything else is an entry this loop never saw: a read whose reply
        was lost (a cluster pipeline runs again, after an error on any node, each command
        whose reply it lacks), to be applied before this read's entries. Then go back to the
        pending list, which has them all in order (`_missed`).
        """
        read, pending = results[-2:]
        try:
            self.acked(results[:-2])
        except (*REDIS_DOWN, ResponseError):
            self.ahead, self._missed = [], True  # acks kept; the pending path sorts it out
            return
        if isinstance(read, BaseException) or isinstance(pending, BaseException):
            self.ahead, self._missed = [], True
            return
        entries = parse_read(read)
        held = [_text(row["message_id"]) for row in pending]
        self._missed = held != applying + [entry.id for entry in entries]
        self.ahead = [] if self._missed else entries

    def queue_acks(self, pipe: Pipeline, lazy: bool = False) -> int:
        """Queue what follows the last batch's effects: usage counts, retries, then the acks.

        Returns how many commands were queued; their replies go to `acked`. `lazy` (the joint
        loop under load) leaves plain acks for a later round while there are fewer than
        `LAZY_ACKS` of them, none older than `LAZY_ACK_SECONDS` and no usage or retry to
        send: at light load every round otherwise carried an XACK per partition (0.64 XACK
        per delivered event). Entries applied and not yet acknowledged are at most redelivered
        after a crash, and the applied marks and the task script drop what was applied.
        """
        self._acks_deferred = (
            lazy
            and not self._spent
            and not self._retries
            and not self._ended
            and len(self._acks) < LAZY_ACKS
            and time.monotonic() - self._acks_since < LAZY_ACK_SECONDS
        )
        if self._acks_deferred:
            return 0
        scripts = self.effects.scripts
        for spent in self._spent:
            script_keys, args = self.usage.add_call(
                spent.ref.tenant_id,
                spent.ref.task_id,
                input_tokens=spent.usage.input_tokens,
                output_tokens=spent.usage.output_tokens,
                cost=spent.usage.cost,
            )
            scripts.queue(pipe, scripts.usage_add, script_keys, args)
        for deadlines, members in self._ended.items():
            pipe.zrem(deadlines, *members)
        if self._retries:  # scheduled before the failure callbacks are acknowledged
            pipe.zadd(keys.partition_retries(self.partition), self._retries)
        if self._acks:
            pipe.xack(self.stream, keys.WORKER_GROUP, *self._acks)
        return len(self._spent) + len(self._ended) + bool(self._retries) + bool(self._acks)

    def acked(self, replies: list[Any]) -> None:
        """Take the replies of what `queue_acks` queued; raise the first failed ack (the acks
        and retries are then kept for the next round trip). A usage count that failed is kept
        too (counting is once per task, so sending it again is harmless)."""
        if self._acks_deferred:  # nothing was queued (see `queue_acks`)
            return
        counting, self._spent = self._spent, []
        for spent, reply in zip(counting, replies, strict=False):
            if isinstance(reply, BaseException):
                self._spent.append(spent)
                self.reload_scripts |= missing_script(reply)
            elif reply:
                metrics.observe_usage(self.tenant_labels, spent.ref.tenant_id, spent.usage)
        for reply in replies[len(counting) :]:
            if isinstance(reply, BaseException):
                raise reply
        self._acks = []
        self._retries = {}
        self._ended = {}

    async def _flush_acks(self) -> None:
        if not self._acks and not self._retries and not self._spent and not self._ended:
            return
        if self.reload_scripts:
            self.reload_scripts = False
            await self.effects.scripts.load()
        async with self.redis.pipeline(transaction=False) as pipe:
            self.queue_acks(pipe)
            replies = await pipe.execute(raise_on_error=False)
        self.acked(replies)

    async def _handle(self, entries: list[Entry], read_ahead: bool = False) -> bool:
        """Apply a batch; True when every entry was applied (to be acknowledged with the next
        read) or dead-lettered. With `read_ahead`, the next batch is read with the effects."""
        self._missed = False
        batch = await self.decode(entries)
        if batch is None:
            return True
        try:
            return await self._apply(batch, read_ahead)
        finally:
            batch.end_spans()

    async def decode(self, entries: list[Entry]) -> Batch | None:
        """The callbacks of `entries`, with their spans; what cannot be decoded goes to the
        dead letters at once. None when nothing is left to apply."""
        decoded: list[tuple[Entry, Callback]] = []
        for entry in entries:
            raw = entry.raw_action
            if raw is None:
                reason = "stream entry has no 'action' field"
                await self._dead_letter(entry, reason)
                # An answer written under another field name (`payload`, `data`) still ends
                # its task: the dead letter keeps the fields, the client is told at once.
                for value in entry.fields.values():
                    failure = await self._failure_for(value, reason)
                    if failure is not None:
                        decoded.append((entry, failure))
                        break
                continue
            try:
                decoded.append((entry, decode_callback(raw)))
            except MalformedAction as exc:
                await self._dead_letter(entry, f"malformed action: {exc.reason}")
                failure = await self._failure_for(raw, exc.reason)
                if failure is not None:  # the task is told, not left to its deadline
                    decoded.append((entry, failure))
        if not decoded:
            return None
        spans = [
            self._span_for(
                entry,
                action,
                len(entries),
                await self._seed_carrier(action) if isinstance(action, ExecutionCallback) else None,
            )
            for entry, action in decoded
        ]
        return Batch(decoded, spans)

    async def _failure_for(self, raw: bytes, reason: str) -> UnreadableAnswer | None:
        """The failure of an unreadable final answer's task (`failure_for_unreadable`). An
        answer that names its task but not its tenant or session (one left out) is placed
        by the task's location, as `GET /api/chat/tasks/{id}` places it."""
        failure = failure_for_unreadable(raw, reason)
        task_id = None if failure is not None else unreadable_answer_task(raw)
        if task_id is None:
            return failure
        try:
            where = await self.effects.tasks.locate(task_id)
        except (*REDIS_DOWN, *REDIS_REFUSING):
            return None  # dead-lettered; the task is left to its deadline
        if where is None:
            return None
        return failure_for_unreadable(raw, reason, (where.tenant_id, where.session_id))

    async def _seed_carrier(self, action: ExecutionCallback) -> dict[str, str] | None:
        """The trace context a seed AES's `execution.callback` continues: it carries none, but
        its task's own `chat.process` (kept in the task's state) does. Without it the
        answer's hops started a trace of their own, cut off from the message's (one read, on
        a compatibility path only)."""
        state = keys.task_state(action.tenant_id, action.session_id, action.task_id)
        try:
            kept = await self.redis.hget(state, "action")
        except (*REDIS_DOWN, *REDIS_REFUSING):
            return None
        return stored_trace({"action": kept.decode() if isinstance(kept, bytes) else kept})

    def _span_for(
        self, entry: Entry, action: Callback, batch: int, seed_carrier: dict[str, str] | None
    ) -> Span | None:
        """A CONSUMER span for the callbacks that end or retry a task, and for an AES's
        `websocket.send`/`websocket.broadcast` that carries a valid trace context (its
        frame then carries the context to the api pods, as a completion's does). Chunks get
        none (a stream is one span on the producer's side, not one span per chunk), nor do
        untraced sends: no span object at all, they may come at 10 000/s."""
        if isinstance(action, ExecutionChunk):
            return None
        task_id: str | None = action.task_id
        attempt: int | None = None
        if isinstance(action, WebsocketSend | WebsocketBroadcast):
            parent = telemetry.remote_parent(action.trace_context)
            if parent is None:  # checked first: an untraced send costs nothing more
                return None
        elif isinstance(action, ExecutionCallback):
            parent, attempt = telemetry.extract(seed_carrier), 0
        else:
            parent, attempt = telemetry.extract(action.trace_context), action.attempt
        attributes = telemetry.messaging_attributes(
            self.stream, "process", message_id=entry.id, group=keys.WORKER_GROUP, batch=batch
        )
        if task_id is not None:  # a send may belong to no task
            attributes["orchestrator.task_id"] = task_id
        if attempt is not None:  # a send has no attempt
            attributes["orchestrator.attempt"] = attempt
        attributes["orchestrator.action_type"] = action_type_of(action)
        return telemetry.tracer().start_span(
            f"process {self.stream}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )

    async def _apply(self, batch: Batch, read_ahead: bool) -> bool:
        decoded = batch.decoded
        async with self.redis.pipeline(transaction=False) as pipe:
            await self.queue_effects(batch, pipe)
            if not self._lease_valid():  # expired while the batch was read and decoded
                return False
            if read_ahead:
                self.queue_acks(pipe)
                self._queue_read_ahead(pipe, len(decoded), block=batch.quiet())
            batch.applied_at = clock.now()  # compared with Redis's stream ids (lag)
            results = await pipe.execute(raise_on_error=False)
        if read_ahead:
            self._read_ahead(results[len(decoded) :], [entry.id for entry, _ in decoded])
            del results[len(decoded) :]
        return await self.settle(batch, results)

    async def queue_effects(self, batch: Batch, pipe: Pipeline) -> None:
        """Queue the effect of each callback of `batch` on `pipe`, in stream order."""
        previous: dict[tuple[str, ...], str] = {}
        chunked: dict[tuple[str, str, str, int], int] = {}  # task attempt -> last chunk seq
        for (entry, action), span in zip(batch.decoded, batch.spans, strict=True):
            position = None
            order = _order_key(action)
            if order is not None:
                position = Position(self.stream, entry.id, previous.get(order, ""))
                previous[order] = entry.id
            after_seq = 0
            if isinstance(action, ExecutionChunk | ExecutionCompleted) and action.attempt:
                attempt = (action.tenant_id, action.session_id, action.task_id, action.attempt)
                after_seq = chunked.get(attempt, 0)
                if isinstance(action, ExecutionChunk):
                    chunked[attempt] = max(after_seq, action.seq)
            traceparent = telemetry.traceparent(span) if span else ""
            batch.plans.append(
                await self.effects.queue(action, pipe, traceparent, position, after_seq)
            )

    async def settle(self, batch: Batch, results: list[Any]) -> bool:
        """Take the replies of the batch's effects: what applied is acknowledged with the next
        round trip (with its follow-ups), what failed is retried or dead-lettered. True when
        the loop may go on reading; False when the partition must go back to its pending list
        (an entry failed, waits for a failed predecessor, or met a server without scripts)."""
        decoded, plans, spans, applied_at = (
            batch.decoded,
            batch.plans,
            batch.spans,
            batch.applied_at,
        )
        reloaded = any(missing_script(result) for result in results)
        if reloaded:
            await self.effects.scripts.load()  # Redis lost its scripts; those entries retry
        waiting = False
        done: list[str] = []
        finished: list[tuple[TaskRef, str | None]] = []
        retries: dict[str, float] = {}
        failed: list[tuple[Entry, BaseException]] = []
        verdicts: Counter[Verdict] = Counter()
        for (entry, action), plan, result, span in zip(decoded, plans, results, spans, strict=True):
            if isinstance(result, BaseException):
                # A missing script is Redis's state, not the entry's fault, and a deferred
                # entry waits for its session's failed predecessor: neither counts towards
                # dead-lettering (an entry kept pending through an outage or failover has been
                # delivered many times already).
                if _deferred(result) or isinstance(result, REDIS_REFUSING):
                    # Refusing (out of memory, a demoted primary during a failover) is also
                    # Redis's state: counted, a healthy completion could be dead-lettered.
                    waiting = True
                    self._untried[entry.id] += 1
                elif missing_script(result):
                    self._untried[entry.id] += 1
                else:
                    failed.append((entry, result))
                if span is not None:
                    telemetry.fail(
                        span, f"handler failed: {result}", error_type=type(result).__name__
                    )
                continue
            done.append(entry.id)
            if self._untried:
                self._untried.pop(entry.id, None)
            outcome = parse_outcome(result)
            verdicts[outcome.verdict] += 1
            exemplar = telemetry.exemplar(span) if span is not None else None
            if isinstance(action, ExecutionChunk) and outcome.first_chunk:
                exemplar = telemetry.remote_exemplar(action.trace_context)
            if outcome.verdict in _DELIVERED:  # a redelivery that changed nothing is not timed
                _LAG.since(entry.id, applied_at, exemplar)
            if not isinstance(action, WebsocketSend | WebsocketBroadcast):  # no task metrics
                metrics.observe(
                    action,
                    outcome,
                    retried=isinstance(plan, Retry),
                    exemplar=exemplar,
                    applied_at=applied_at,
                )
            if span is not None:
                _describe(span, outcome, plan, action)
            if _ends_task(action, plan) and outcome.verdict in (Verdict.ok, Verdict.final):
                ref = TaskRef(action.tenant_id, action.session_id, str(action.task_id))
                finished.append((ref, outcome.detail if outcome.verdict is Verdict.ok else None))
                self._end_deadline(ref)
            if isinstance(plan, Retry) and outcome.verdict in (Verdict.ok, Verdict.requeued):
                retries[plan.member] = plan.due
            elif isinstance(plan, Spent) and _spent_on_the_task(outcome):
                # Counted with the next round trip, before this entry's ack (`queue_acks`).
                self._spent.append(plan)
        if finished and self.settings.database_url:
            # For the durable record; a redelivery publishes again and the writer's keys
            # make that harmless. Delivery has already happened: this only delays the ack.
            await publish_finished(self.redis, finished, maxlen=self.settings.persist_stream_maxlen)
        for verdict, count in verdicts.items():
            metrics.callbacks_handled.labels(verdict).inc(count)
        # Acknowledged with the next read (see the module's docstring).
        if done and not self._acks:
            self._acks_since = time.monotonic()
        self._acks += done
        self._retries.update(retries)
        if not failed:
            return not (reloaded or waiting)
        counts = await delivery_counts(
            self.redis, self.stream, keys.WORKER_GROUP, [entry for entry, _ in failed]
        )
        for entry, error in failed:
            tried = counts.get(entry.id, 0) - self._untried[entry.id]
            if tried >= self.settings.max_delivery_attempts:
                self._untried.pop(entry.id, None)
                await self._dead_letter(entry, f"handler failed: {error}")
            else:
                log.warning("callback %s failed, will retry: %s", entry.id, error)
        return False

    def _end_deadline(self, ref: TaskRef) -> None:
        """Remove the task's deadline with the next acks (where the api put it: the session's
        partition, which is this one unless the partition count changed in between)."""
        partition = keys.partition_of(
            ref.tenant_id, ref.session_id, self.settings.callback_partitions
        )
        member = keys.task_member(ref.tenant_id, ref.session_id, ref.task_id)
        self._ended.setdefault(keys.partition_deadlines(partition), []).append(member)

    async def _dead_letter(self, entry: Entry, reason: str) -> None:
        """On the trace of the message the entry names, and logged with its ids: the SRE
        following a message whose answer was dead-lettered finds it there (a trace of its
        own, with no task, was reachable from nothing)."""
        carrier, ids = loose_origin(entry.raw_action)
        attributes = {"orchestrator.task_id": ids["task_id"]} if "task_id" in ids else {}
        with (
            log_context(**ids),
            telemetry.consumer(
                self.stream, carrier, message_id=entry.id, group=keys.WORKER_GROUP, **attributes
            ) as span,
        ):
            telemetry.fail(span, "dead-lettered", error_type="dead_letter", reason=reason[:200])
            await dead_letter(self.redis, entry, keys.WORKER_GROUP, reason)

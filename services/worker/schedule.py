"""Time-driven work of one partition, run by its lease holder: deadlines and retries.

Both live in sorted sets on the partition's slot (`{cb:N}:deadlines`, `{cb:N}:retries`), so
whoever consumes the partition also fires its timers, and a dead worker's timers move with
its partitions. Firing is idempotent: the task script refuses a timeout for a final task and a
dispatch for a task that is not waiting, so a timer fired twice changes nothing.

The worker looks for due timers of all its partitions at once, in one round trip per tick
(`fire_due_all`), off the partitions' consumer loops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import cast

import msgspec
from opentelemetry.trace import SpanKind
from redis.asyncio import Redis

from services.core import clock, events, keys, telemetry
from services.core.actions import (
    ACTION_FIELD,
    ChatCancel,
    ChatProcess,
    MalformedAction,
    decode_action,
    encode_action,
)
from services.core.ids import is_valid_id, new_id
from services.core.scripts import missing_script
from services.core.tasks import TaskRef, TaskStatus, TaskStore, Verdict, encode_json, parse_outcome
from services.persistence.records import publish_finished
from services.worker import metrics

log = logging.getLogger(__name__)


BATCH = 100
RETRY_CONCURRENCY = 20  # retries of one partition handed out at once
AES_STREAM_MAXLEN = 1_000_000
TICK_SECONDS = 0.2  # how often the worker looks for due deadlines and retries
# After how long a retry's dispatch that was not confirmed (its XADD failed, or its worker
# died) is handed out again: well past a command's own bound (2 s), so not one in flight.
REDISPATCH_MS = 5_000


def _ref(member: bytes | str) -> TaskRef:
    text = member.decode() if isinstance(member, bytes) else member
    tenant_id, session_id, task_id = text.split("/", 2)
    return TaskRef(tenant_id, session_id, task_id)


def stored_trace(state: dict[str, str | None] | None) -> dict[str, str] | None:
    """The trace context of the task's original `chat.process` (kept in its state)."""
    raw = (state or {}).get("action")
    if not raw:
        return None
    try:
        action = decode_action(raw)
    except MalformedAction:
        return None
    return action.trace_context if isinstance(action, ChatProcess) else None


class PartitionSchedule:
    def __init__(self, redis: Redis, tasks: TaskStore, partition: int) -> None:
        self.redis = redis
        self.tasks = tasks
        self.settings = tasks.settings
        self.deadlines = keys.partition_deadlines(partition)
        self.retries = keys.partition_retries(partition)

    async def fire_due(self, now: float | None = None) -> None:
        await fire_due_all(self.redis, [self], now)

    async def fire(self, deadlines: list[bytes], retries: list[bytes], moment: float) -> int:
        """Fire the members of the partition's deadlines and retries due at `moment`; how many
        left the sets (a retry handed out a moment ago and maybe still on its way stays)."""
        fired = 0
        if deadlines:
            await self._time_out(deadlines)
            fired += len(deadlines)
        if retries:
            fired += await self._dispatch_retries(retries, moment)
        return fired

    async def _time_out(self, members: list[bytes]) -> None:
        error = {
            "code": "timed_out",
            "message": "the task did not finish before its deadline",
            "details": {},
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                ref = _ref(member)
                body = events.event_body(events.CHAT_ERROR, error, ref.task_id)
                await self.tasks.apply(
                    ref,
                    "timeout",
                    body=body,
                    fields={"status": TaskStatus.timed_out, "error": encode_json(error)},
                    pipe=pipe,
                )
            results = await pipe.execute(raise_on_error=False)
        if any(missing_script(result) for result in results):
            await self.tasks.scripts.load()  # fired again at the next tick
            return
        finished: list[tuple[TaskRef, str | None]] = []
        for member, result in zip(members, results, strict=True):
            outcome = parse_outcome(result)
            if outcome.verdict is Verdict.ok:
                metrics.timeouts.inc()
                metrics.tasks.labels("timed_out", outcome.tier or "unknown").inc()
                await self._trace_timeout(_ref(member))
                finished.append((_ref(member), outcome.detail))
            elif outcome.verdict is Verdict.final and outcome.detail == TaskStatus.timed_out:
                # Timed out by an owner that died before the record and the AES's notice (its
                # deadline is still here): both again, both taken once downstream.
                finished.append((_ref(member), None))
        if finished and self.settings.database_url:
            await publish_finished(self.redis, finished, maxlen=self.settings.persist_stream_maxlen)
        if finished:
            await self._cancel_at_aes([ref for ref, _ in finished])
        await self.redis.zrem(self.deadlines, *members)

    async def _cancel_at_aes(self, refs: list[TaskRef]) -> None:
        """Tell the AES to stop the timed-out tasks: nobody takes their answers any more, and
        a run that goes on holds a slot later messages wait for."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for ref in refs:
                notice = ChatCancel(
                    tenant_id=ref.tenant_id,
                    session_id=ref.session_id,
                    task_id=ref.task_id,
                    reason="timed out",
                )
                pipe.xadd(
                    keys.CANCEL_STREAM,
                    {ACTION_FIELD: encode_action(notice)},
                    maxlen=keys.CANCEL_STREAM_MAXLEN,
                    approximate=True,
                )
            await pipe.execute()

    async def _trace_timeout(self, ref: TaskRef) -> None:
        """Put the timeout on the message's trace (its context is in the stored action)."""
        state = await self.tasks.read(ref)
        carrier = stored_trace(state)
        with telemetry.tracer().start_as_current_span(
            "task timed out",
            context=telemetry.extract(carrier),
            attributes={
                "orchestrator.task_id": ref.task_id,
                "orchestrator.attempt": int((state or {}).get("attempt") or 1),
            },
        ) as span:
            telemetry.fail(
                span, "the task did not finish before its deadline", error_type="timeout"
            )

    async def _dispatch_retries(self, members: list[bytes], moment: float) -> int:
        """Hand out each due retry, `RETRY_CONCURRENCY` at a time: each takes a few round
        trips, and one after the other a batch of 100 took long enough that, with hundreds
        due at once (an overloaded AES answering `retryable`), retries went out seconds past
        their `retry_in_ms`. Each member is a different task: their order does not matter."""
        limit = asyncio.Semaphore(RETRY_CONCURRENCY)

        async def one(member: bytes) -> bool:
            async with limit:
                return await self._dispatch_retry(member, moment)

        return sum(await asyncio.gather(*(one(member) for member in members)))

    async def _dispatch_retry(self, member: bytes, moment: float) -> bool:
        ref = _ref(member)
        outcome = await self.tasks.apply(ref, "dispatch", seq=REDISPATCH_MS)
        if outcome is not None and outcome.verdict is Verdict.pending:
            return False  # handed out a moment ago, maybe still on its way: looked at again
        if outcome is not None and outcome.verdict is Verdict.ok and outcome.detail:
            # Should this fail, the retry stays due and the task script hands the attempt
            # out again after REDISPATCH_MS (see `dispatch` in task_event.lua).
            await self._enqueue_attempt(ref, outcome.detail)
        # Not a plain ZREM: the attempt just handed out may already have failed and its
        # requeue set this member again, for later (see zrem_if_due.lua).
        await self.tasks.scripts.zrem_if_due(keys=[self.retries], args=[member, repr(moment)])
        return True

    async def _enqueue_attempt(self, ref: TaskRef, stored: str) -> None:
        try:
            action = decode_action(stored)
        except MalformedAction as exc:
            log.error("stored action of task %s is unreadable: %s", ref.task_id, exc.reason)
            return
        if not isinstance(action, ChatProcess):
            return
        state = await self.tasks.read(ref)
        attempt = int((state or {}).get("attempt") or action.attempt)
        stream = keys.aes_stream(action.priority)
        with telemetry.tracer().start_as_current_span(
            f"send {stream}",
            context=telemetry.extract(action.trace_context),
            kind=SpanKind.PRODUCER,
            attributes={
                **telemetry.messaging_attributes(stream, "send"),
                "orchestrator.task_id": ref.task_id,
                "orchestrator.attempt": attempt,
                "orchestrator.retry": True,
            },
        ) as span:
            # One action id per attempt: an attempt handed out again (its first XADD's reply
            # was lost, but it may have been added) is the same action to the AES.
            again = msgspec.structs.replace(
                action,
                action_id=_attempt_action_id(ref.task_id, attempt),
                attempt=attempt,
                trace_context=telemetry.inject(span),
            )
            # The attempt and its confirmation in one write: a worker killed between two round
            # trips left an added attempt unconfirmed, and the next owner of the partition
            # handed it out a second time (REDISPATCH_MS later).
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(
                    stream,
                    {ACTION_FIELD: msgspec.json.encode(again)},
                    maxlen=AES_STREAM_MAXLEN,
                    approximate=True,
                )
                pipe.hdel(
                    keys.task_state(ref.tenant_id, ref.session_id, ref.task_id), "dispatched_ms"
                )
                await pipe.execute()
        metrics.retries.inc()


def _attempt_action_id(task_id: str, attempt: int) -> str:
    action_id = f"{task_id}-a{attempt}"
    return action_id if is_valid_id(action_id) else new_id()


async def fire_due_all(
    redis: Redis, schedules: Sequence[PartitionSchedule], now: float | None = None
) -> bool:
    """Fire what is due in every partition of `schedules`: one round trip finds it all, the
    partitions are fired side by side. True when a partition had a full batch due: more may
    be due already, and the caller fires again at once instead of waiting a tick."""
    if not schedules:
        return False
    moment = clock.now() if now is None else now  # the api set the deadlines on this clock
    async with redis.pipeline(transaction=False) as pipe:
        for schedule in schedules:
            pipe.zrangebyscore(schedule.deadlines, "-inf", moment, start=0, num=BATCH)
            pipe.zrangebyscore(schedule.retries, "-inf", moment, start=0, num=BATCH)
        due = cast(list[list[bytes]], await pipe.execute())
    firing, full = [], []
    for i, schedule in enumerate(schedules):
        deadlines, retries = due[2 * i], due[2 * i + 1]
        if deadlines or retries:
            firing.append(schedule.fire(deadlines, retries, moment))
            full.append(len(deadlines) >= BATCH or len(retries) >= BATCH)
    fired = await asyncio.gather(*firing)
    # (A full batch that fired nothing is retries handed out a moment ago: not again at once.)
    return any(was_full and count for was_full, count in zip(full, fired, strict=True))

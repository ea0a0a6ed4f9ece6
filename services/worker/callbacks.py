"""What each AES callback does: move the task's state and emit the client event, atomically.

Every effect is one script call on the session's slot (see `TaskStore`), queued on a pipeline
so a batch of callbacks costs one round trip. Effects are idempotent: a redelivered chunk, a
second final answer, or a callback of a superseded attempt changes nothing and is only counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline

from services.core import clock, events, keys
from services.core.actions import (
    Callback,
    ExecutionCallback,
    ExecutionChunk,
    ExecutionCompleted,
    ExecutionFailed,
    Usage,
    WebsocketBroadcast,
    WebsocketSend,
    action_type_of,
)
from services.core.scripts import Scripts
from services.core.settings import Settings
from services.core.tasks import TaskRef, TaskStatus, TaskStore, encode_json

# How long a session's (a tenant's) applied mark outlives its last websocket.send (broadcast):
# far beyond any redelivery, one small key per session.
DEDUPE_TTL_SECONDS = 86_400


@dataclass(frozen=True, slots=True)
class Position:
    """Where a callback sits in its partition stream, for the once-only marks of
    `websocket.send` and `websocket.broadcast`: its entry id, and the id of the previous entry
    of the same session (tenant, for broadcasts) queued in the same batch, or ''."""

    stream: str
    entry_id: str
    previous: str = ""


@dataclass(frozen=True, slots=True)
class Retry:
    """A retry to schedule once the requeue is applied: the task's member and due time."""

    partition: int
    member: str
    due: float


@dataclass(frozen=True, slots=True)
class Spent:
    """Usage to count against the tenant's budget once the completion is applied."""

    ref: TaskRef
    usage: Usage


FollowUp = Retry | Spent


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class CallbackEffects:
    def __init__(self, tasks: TaskStore, scripts: Scripts, settings: Settings) -> None:
        self.tasks = tasks
        self.scripts = scripts
        self.settings = settings

    async def queue(
        self,
        action: Callback,
        pipe: Pipeline,
        traceparent: str = "",
        position: Position | None = None,
        after_seq: int = 0,
    ) -> FollowUp | None:
        """Queue the effect of one callback on `pipe`; its reply says what happened.

        What must follow once the effect is applied is returned: a `Retry` to schedule (a
        retryable failure with attempts left became a requeue), or the `Spent` usage of a
        completed task to count. `websocket.send` and `websocket.broadcast` need their
        `position` (they are applied once per stream entry). A chunk or a completion after
        a chunk of the same attempt in the same pipeline names that chunk's seq
        (`after_seq`): the effect waits for it (DEFERRED) if it failed.
        """
        if isinstance(action, ExecutionChunk):
            await self._chunk(action, pipe, after_seq)
        elif isinstance(action, ExecutionCompleted):
            ref = TaskRef(action.tenant_id, action.session_id, action.task_id)
            await self._completed(
                ref, action.attempt, action.content, action.usage, pipe, traceparent, after_seq
            )
            return Spent(ref, action.usage)
        elif isinstance(action, ExecutionFailed):
            ref = TaskRef(action.tenant_id, action.session_id, action.task_id)
            if action.retryable and action.attempt < self.settings.max_task_attempts:
                return await self._requeue(ref, action, pipe, traceparent)
            await self._failed(
                ref,
                action.attempt,
                action.code,
                action.error,
                pipe,
                attempts=action.attempt or None,  # 0: an unreadable answer's current one
                traceparent=traceparent,
            )
        elif isinstance(action, ExecutionCallback):
            return await self._legacy(action, pipe, traceparent)
        elif position is None:
            raise ValueError(f"{action_type_of(action)} needs its stream position")
        elif isinstance(action, WebsocketSend):
            self._send(action, pipe, position, traceparent)
        else:
            self._broadcast(action, pipe, position)
        return None

    async def _chunk(self, action: ExecutionChunk, pipe: Pipeline, after_seq: int) -> None:
        ref = TaskRef(action.tenant_id, action.session_id, action.task_id)
        # `attempt` too: a retry's chunks start again at seq 1, and a client that missed the
        # retry's `chat.status` (a resume past it) could only tell them apart by this.
        body = events.event_body(
            events.CHAT_CHUNK,
            {"delta": action.delta, "seq": action.seq, "attempt": action.attempt},
            action.task_id,
        )
        await self.tasks.apply(
            ref,
            "chunk",
            attempt=action.attempt,
            seq=action.seq,
            body=body,
            pipe=pipe,
            after_seq=after_seq,
        )

    async def _completed(
        self,
        ref: TaskRef,
        attempt: int,
        content: str,
        usage: Usage,
        pipe: Pipeline,
        traceparent: str = "",
        after_seq: int = 0,
    ) -> None:
        usage_data = {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "model": usage.model,
            "cost": usage.cost,
        }
        result = {"content": content, "role": "assistant"}
        body = events.event_body(events.CHAT_RESPONSE, {**result, "usage": usage_data}, ref.task_id)
        await self.tasks.apply(
            ref,
            "completed",
            attempt=attempt,
            body=body,
            fields={
                "status": TaskStatus.completed,
                "result": encode_json(result),
                "usage": encode_json(usage_data),
            },
            pipe=pipe,
            traceparent=traceparent,
            after_seq=after_seq,
        )

    async def _requeue(
        self, ref: TaskRef, action: ExecutionFailed, pipe: Pipeline, traceparent: str = ""
    ) -> Retry:
        settings = self.settings
        delay = backoff_seconds(
            action.attempt, settings.retry_backoff_seconds, settings.retry_backoff_max_seconds
        )
        data = {
            "status": TaskStatus.queued,
            "attempt": action.attempt + 1,
            "retry_in_ms": round(delay * 1000),
            "reason": action.error,
        }
        body = events.event_body(events.CHAT_STATUS, data, ref.task_id)
        await self.tasks.apply(
            ref,
            "requeue",
            attempt=action.attempt,
            body=body,
            pipe=pipe,
            traceparent=traceparent,
        )
        return Retry(
            keys.partition_of(ref.tenant_id, ref.session_id, settings.callback_partitions),
            keys.task_member(ref.tenant_id, ref.session_id, ref.task_id),
            clock.now() + delay,  # fired by whichever worker owns the partition then
        )

    async def _failed(
        self,
        ref: TaskRef,
        attempt: int,
        code: str,
        message: str,
        pipe: Pipeline,
        *,
        attempts: int | None = None,
        traceparent: str = "",
    ) -> None:
        # `details` as in every error (README); `attempts` also at the top, as before.
        error: dict[str, Any] = {"code": code, "message": message, "details": {}}
        if attempts is not None:
            error["attempts"] = attempts
            error["details"] = {"attempts": attempts}
        body = events.event_body(events.CHAT_ERROR, error, ref.task_id)
        await self.tasks.apply(
            ref,
            "failed",
            attempt=attempt,
            body=body,
            fields={"status": TaskStatus.failed, "error": encode_json(error)},
            pipe=pipe,
            traceparent=traceparent,
        )

    async def _legacy(
        self, action: ExecutionCallback, pipe: Pipeline, traceparent: str
    ) -> Spent | None:
        """The seed's `execution.callback`, applied to whatever attempt is current."""
        ref = TaskRef(action.tenant_id, action.session_id, action.task_id)
        if action.status == "completed":
            tokens = action.tokens_used
            usage = Usage()
            if tokens is not None:
                # A `total` beyond input + output (an AES that reports the total only) is
                # counted as output: the budget must see every token the AES reported.
                output = max(tokens.output, tokens.total - tokens.input)
                usage = Usage(input_tokens=tokens.input, output_tokens=output)
            content = action.result.response if action.result else ""
            await self._completed(ref, 0, content, usage, pipe, traceparent)
            return Spent(ref, usage)
        code = "timeout" if action.status == "timeout" else "execution_failed"
        message = action.error.message if action.error else action.status
        await self._failed(ref, 0, code, message, pipe, traceparent=traceparent)
        return None

    def _send(
        self, action: WebsocketSend, pipe: Pipeline, position: Position, traceparent: str = ""
    ) -> None:
        """Append to the session log and publish, once per stream entry. A `traceparent`
        (the worker's span of a traced send) prefixes the published frame only, as a
        completion's does (task_event.lua), so the api pods continue the trace; the log
        never stores it. An untraced send passes the script's arguments as before."""
        settings = self.settings
        body = events.event_body(events.MESSAGE, action.message, action.task_id)
        tenant, session = action.tenant_id, action.session_id
        args: list[str | int] = [
            body,
            settings.session_log_maxlen,
            settings.session_log_ttl_seconds * 1000,
            keys.session_channel(tenant, session),
            DEDUPE_TTL_SECONDS,
            position.entry_id,
            position.previous,
            position.stream,
        ]
        if traceparent:
            args.append(f"{traceparent}\n")
        self.scripts.queue(
            pipe,
            self.scripts.session_event,
            [keys.session_applied(tenant, session), keys.session_log(tenant, session)],
            args,
        )

    def _broadcast(self, action: WebsocketBroadcast, pipe: Pipeline, position: Position) -> None:
        """Publish to the tenant's channel, once per stream entry. A traced broadcast's trace
        ends at the worker's span: the tenant channel carries the frame alone, as every api
        version reads it (an api of the version before would forward a traceparent prefix to
        its clients as broken JSON during a rolling upgrade)."""
        body = events.event_body(events.MESSAGE, action.message, action.task_id)
        self.scripts.queue(
            pipe,
            self.scripts.broadcast,
            [keys.tenant_applied(action.tenant_id)],
            [
                body,
                keys.tenant_channel(action.tenant_id),
                DEDUPE_TTL_SECONDS,
                position.stream,
                position.entry_id,
                position.previous,
            ],
        )

"""The persistence record: what the worker tells the writer about one finished task.

One record per task that reached a final status, added to `keys.PERSIST_RECORDS` in the one
field `action` (like every entry on our streams, so the dead-letter tools can show and replay
it). It holds everything the writer needs without asking Redis again: the user's message, the
answer, the final state and the usage, and the session log id of the task's final event.

Publishing is at-least-once: the worker may publish a task again (a redelivered callback, a
retried batch) and the writer keeps the first copy. Decoding is strict about types and ids
and tolerant of extra fields; an entry that does not decode is dead-lettered by the writer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline

from services.core import clock, keys
from services.core.actions import ACTION_FIELD, MAX_COST
from services.core.ids import Id
from services.core.tasks import FINAL_STATUSES, TaskRef

log = logging.getLogger(__name__)

RECORD_VERSION = 1

FinalStatus = Literal["completed", "failed", "cancelled", "timed_out"]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # bigint columns
Attempt = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]  # integer column
EventId = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$(?!\n)")]
Moment = Annotated[datetime, msgspec.Meta(tz=True)]


class MalformedRecord(ValueError):
    """The entry is not a valid record; `reason` is kept with the dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RecordUsage(msgspec.Struct, kw_only=True):
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    cost: Annotated[float, msgspec.Meta(ge=0, le=MAX_COST)] = 0.0
    model: str | None = None


class PersistRecord(msgspec.Struct, kw_only=True):
    """A finished task: its user message, its answer (when completed), its state and usage.

    `final_event_id` is the session log id of the task's final event (`chat.response`,
    `chat.error`, `chat.cancelled`); history is ordered by it and `after_event_id` compares
    against it. `completed_at` is when the task became final; its UTC day is the usage day.
    """

    version: int = RECORD_VERSION
    tenant_id: Id
    session_id: Id
    task_id: Id
    agent_id: Id
    user_id: str | None = None
    status: FinalStatus
    attempt: Attempt = 1
    message: str
    content: str | None = None
    error: dict[str, Any] | None = None
    usage: RecordUsage = msgspec.field(default_factory=RecordUsage)
    final_event_id: EventId | None = None
    created_at: Moment
    first_chunk_at: Moment | None = None
    completed_at: Moment
    # The W3C context of the message's send (its `chat.process` action's): the writer's span
    # joins the message's trace. Absent from records of older versions, ignored by them.
    trace_context: dict[str, str] = msgspec.field(default_factory=dict)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PersistRecord)


def encode_record(record: PersistRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(raw: bytes | str) -> PersistRecord:
    """Strict decode; `MalformedRecord` says what is wrong."""
    try:
        return _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise MalformedRecord(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise MalformedRecord(f"not JSON: {exc}") from None


UNWRITTEN_TTL_SECONDS = 3600
"""How long a session's list of records on their way outlives its last addition. A member
whose record is lost (trimmed from the stream by PERSIST_STREAM_MAXLEN, dead-lettered
unreadable, never published) is ignored by readers after `UNWRITTEN_STALE_SECONDS` (see
`services.api.history`)."""


async def publish_record(
    target: Redis | Pipeline | ClusterPipeline,
    record: PersistRecord,
    *,
    maxlen: int | None = None,
) -> None:
    """Add `record` to the persistence stream, and its task to the session's records on their
    way (`keys.session_unwritten`); on a pipeline it is only queued.

    `maxlen` (the `persist_stream_maxlen` setting) bounds the stream while PostgreSQL is
    down: beyond it the oldest records not yet written are dropped (approximate trimming),
    trading history for Redis memory. None: unbounded.
    """
    fields: dict[str | bytes, bytes] = {ACTION_FIELD: encode_record(record)}
    stream = keys.PERSIST_RECORDS
    unwritten = keys.session_unwritten(record.tenant_id, record.session_id)
    if isinstance(target, Pipeline | ClusterPipeline):
        target.xadd(stream, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        target.zadd(unwritten, {record.task_id: int(clock.now() * 1000)})
        target.expire(unwritten, UNWRITTEN_TTL_SECONDS)
    else:
        async with target.pipeline(transaction=False) as pipe:
            await publish_record(pipe, record, maxlen=maxlen)
            await pipe.execute()


class _ProcessAction(msgspec.Struct):
    message: str
    trace_context: dict[str, str] = msgspec.field(default_factory=dict)


def _json(value: Any) -> Any:
    return None if value in (None, "") else msgspec.json.decode(value)


def record_from_task(
    ref: TaskRef, state: Mapping[str, Any], *, final_event_id: str | None = None
) -> PersistRecord:
    """The record of a final task, from its state hash in Redis (`TaskStore.read`).

    `final_event_id` is the event id the task script returned with the final transition;
    without it the hash's `final_event_id` field is used when the script keeps one.
    Raises `MalformedRecord` when the task is not final or its state is incomplete.
    """
    status = state.get("status")
    if status not in FINAL_STATUSES:
        raise MalformedRecord(f"task {ref.task_id} is not final (status {status!r})")
    try:
        action = msgspec.json.decode(state["action"], type=_ProcessAction)
        result = _json(state.get("result")) or {}
        data = {
            **_identity(ref, state),
            "status": status,
            "message": action.message,
            "content": result.get("content") if status == "completed" else None,
            "error": _json(state.get("error")),
            "usage": _json(state.get("usage")) or {},
            "final_event_id": final_event_id or state.get("final_event_id") or None,
            "created_at": state["created_at"],
            "first_chunk_at": state.get("first_chunk_at") or None,
            "completed_at": state.get("updated_at") or state["created_at"],
            "trace_context": action.trace_context,
        }
        return msgspec.convert(data, PersistRecord)
    except (KeyError, ValueError, TypeError, msgspec.MsgspecError) as exc:
        raise MalformedRecord(f"task {ref.task_id}: incomplete state: {exc}") from None


def record_of_erased(ref: TaskRef, state: Mapping[str, Any]) -> PersistRecord:
    """The record of a task its session's erasure ended while it ran, from its state or the
    stub the erasure keeps (`lua/erase_task.lua`): cancelled, its request counted in the
    tenant's usage. No message: the session's history is erased, and the stub keeps none.
    Raises `MalformedRecord` for a state without what the record needs."""
    try:
        data = {
            **_identity(ref, state),
            "status": "cancelled",
            "message": "",
            "created_at": state["created_at"],
            "completed_at": state.get("updated_at") or state["created_at"],
        }
        return msgspec.convert(data, PersistRecord)
    except (KeyError, ValueError, TypeError, msgspec.MsgspecError) as exc:
        raise MalformedRecord(f"task {ref.task_id}: incomplete state: {exc}") from None


def _identity(ref: TaskRef, state: Mapping[str, Any]) -> dict[str, Any]:
    """What every record of a task says of whose it is (KeyError without an agent)."""
    return {
        "tenant_id": ref.tenant_id,
        "session_id": ref.session_id,
        "task_id": ref.task_id,
        "agent_id": state["agent_id"],
        "user_id": state.get("user_id") or None,
        "attempt": int(state.get("attempt") or 1),
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def publish_finished(
    redis: Redis,
    finished: Sequence[tuple[TaskRef, str | None]],
    *,
    maxlen: int | None = None,
) -> int:
    """Publish the records of tasks that just became final: two round trips for a batch.

    `finished` pairs each task with the event id its final transition returned (None on a
    redelivery, when only the task hash may know it). Reads the task hashes in one pipeline
    and adds the records in another; a task whose state is gone or not final is skipped
    (logged), never raised. Returns the number of records published.
    """
    if not finished:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for ref, _ in finished:
            pipe.hgetall(keys.task_state(ref.tenant_id, ref.session_id, ref.task_id))
        states = await pipe.execute()
    records = []
    for (ref, event_id), raw in zip(finished, states, strict=True):
        state = {_text(name): _text(value) for name, value in raw.items()}
        try:
            records.append(record_from_task(ref, state, final_event_id=event_id))
        except MalformedRecord as exc:
            log.warning("no persistence record for task %s: %s", ref.task_id, exc.reason)
    if records:
        async with redis.pipeline(transaction=False) as pipe:
            for record in records:
                await publish_record(pipe, record, maxlen=maxlen)
            await pipe.execute()
    return len(records)

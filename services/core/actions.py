"""Domain actions: the contract between the orchestrator and the Agent Execution Service.

Every action travels as one stream entry with a single field, `action`, holding its JSON.
Decoding is strict about what matters (the `action_type` tag, required fields, id patterns,
types) and tolerant of extra fields, so an AES can add fields without breaking us. Anything
that does not decode is a `MalformedAction` with a reason; consumers dead-letter it instead of
crashing. What an AES answers is read as its JSON Schema (schemas/) allows: a JSON Schema
`integer` admits 12.0, so callbacks are decoded in msgspec's lax mode (an integral float is an
int), or a schema-valid answer was dead-lettered and its task left to time out.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from services.core import clock
from services.core.ids import Id, is_valid_id, new_id
from services.core.keys import Priority

ACTION_FIELD = "action"
CONTRACT_VERSION = 1

# The largest integer every JSON reader keeps exact (a JavaScript number's): the schemas say
# so, and the decoder refuses larger ones (it read no integer beyond 64 bits anyway, so a
# `seq` of 1e20 that a schema without a maximum admitted was dead-lettered).
MAX_SAFE_INTEGER = 2**53 - 1
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=MAX_SAFE_INTEGER)]
Positive = Annotated[int, msgspec.Meta(ge=1, le=MAX_SAFE_INTEGER)]
# msgspec's schema of a datetime says only "string": an AES team reads the format from here.
Timestamp = Annotated[
    datetime,
    msgspec.Meta(
        extra_json_schema={
            "format": "date-time",
            "description": "RFC 3339, without a leap second (a second of 60 is refused)",
        }
    ),
]


def utcnow() -> datetime:
    """Now on Redis's clock (`services.core.clock`): created_at and deadlines are compared by
    other processes."""
    return clock.utcnow()


class MalformedAction(ValueError):
    """The entry is not a valid action; `reason` says why (kept with the dead letter)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Action(msgspec.Struct, kw_only=True, tag_field="action_type", omit_defaults=False):
    """Base of every action; `action_type` is the tag that selects the concrete type."""


class Envelope(Action, kw_only=True):
    """The envelope of DESIGN §4, shared by every action we produce or consume."""

    action_id: Id = msgspec.field(default_factory=new_id)
    version: Annotated[int, msgspec.Meta(ge=-MAX_SAFE_INTEGER, le=MAX_SAFE_INTEGER)] = (
        CONTRACT_VERSION
    )
    tenant_id: Id
    session_id: Id
    task_id: Id
    created_at: Timestamp = msgspec.field(default_factory=utcnow)
    trace_context: dict[str, str] = msgspec.field(default_factory=dict)


class User(msgspec.Struct, kw_only=True):
    id: str
    name: str | None = None


class ChatProcess(Envelope, kw_only=True, tag="chat.process"):
    """Orchestrator -> AES: run the agent on one message and answer on `callback_queue`."""

    agent_id: Id
    message: str
    user: User
    callback_queue: str
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    stream: bool = False
    priority: Priority = "normal"
    deadline: Timestamp
    attempt: Positive = 1


class ChatCancel(Envelope, kw_only=True, tag="chat.cancel"):
    """Orchestrator -> AES (broadcast on the cancel stream): stop working on a task."""

    reason: str = "cancelled by client"


# Usage is added up in Redis (HINCRBY, HINCRBYFLOAT through Lua, whose numbers are doubles):
# bounded far above any real call, so that a count cannot fail there after the task was
# marked counted (infinity, a 1e400 cost, or 2^53 tokens would).
MAX_TOKENS = 10**12
MAX_COST = 10.0**9
Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]


class Usage(msgspec.Struct, kw_only=True):
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    model: str | None = None
    cost: Annotated[float, msgspec.Meta(ge=0, le=MAX_COST)] = 0.0


class ExecutionChunk(Envelope, kw_only=True, tag="execution.chunk"):
    """AES -> orchestrator: one streamed delta. `seq` starts at 1 and grows by one per chunk."""

    seq: Positive
    delta: str
    # Required in every answer (the `attempt` of the `chat.process` answered): it defaulted
    # to 1, so on a retried task an answer that left it out was taken for attempt 1 and
    # dropped as stale, silently, the task left to its deadline. Now such an answer is
    # malformed: dead-lettered, and a final one fails its task at once.
    attempt: Positive


class ExecutionCompleted(Envelope, kw_only=True, tag="execution.completed"):
    """AES -> orchestrator: the final answer of an attempt."""

    content: str
    usage: Usage = msgspec.field(default_factory=Usage)
    attempt: Positive


class ExecutionFailed(Envelope, kw_only=True, tag="execution.failed"):
    """AES -> orchestrator: the attempt failed; `retryable` asks for another attempt."""

    error: str
    code: str = "execution_failed"
    retryable: bool = False
    attempt: Positive


class WebsocketSend(Envelope, kw_only=True, tag="websocket.send"):
    """AES -> orchestrator: an arbitrary message for one session (event type `message`)."""

    task_id: Id | None = None  # type: ignore[assignment]
    message: dict[str, Any]


class WebsocketBroadcast(Envelope, kw_only=True, tag="websocket.broadcast"):
    """AES -> orchestrator: an arbitrary message for every connected session of the tenant."""

    task_id: Id | None = None  # type: ignore[assignment]
    message: dict[str, Any]


class LegacyResult(msgspec.Struct, kw_only=True):
    response: str = ""


class LegacyTokens(msgspec.Struct, kw_only=True):
    input: Tokens = 0
    output: Tokens = 0
    total: Tokens = 0


class LegacyError(msgspec.Struct, kw_only=True):
    type: str = "execution_error"
    message: str = ""


class ExecutionCallback(Action, kw_only=True, tag="execution.callback"):
    """The seed's single callback, accepted from execution services written for it.

    It has none of our envelope fields; the worker treats it as `execution.completed` or
    `execution.failed` for the task's current attempt.
    """

    task_id: Id
    tenant_id: Id
    session_id: Id
    status: Literal["completed", "failed", "timeout"]
    result: LegacyResult | None = None
    execution_time: float | None = None
    tokens_used: LegacyTokens | None = None
    error: LegacyError | None = None


AnyAction = (
    ChatProcess
    | ChatCancel
    | ExecutionChunk
    | ExecutionCompleted
    | ExecutionFailed
    | WebsocketSend
    | WebsocketBroadcast
    | ExecutionCallback
)
Callback = (
    ExecutionChunk
    | ExecutionCompleted
    | ExecutionFailed
    | WebsocketSend
    | WebsocketBroadcast
    | ExecutionCallback
)
ACTION_TYPES: tuple[type[Action], ...] = (
    ChatProcess,
    ChatCancel,
    ExecutionChunk,
    ExecutionCompleted,
    ExecutionFailed,
    WebsocketSend,
    WebsocketBroadcast,
    ExecutionCallback,
)

_encoder = msgspec.json.Encoder()
_any_decoder = msgspec.json.Decoder(AnyAction)
_callback_decoder = msgspec.json.Decoder(Callback, strict=False)


def action_type_of(action: Action) -> str:
    return str(type(action).__struct_config__.tag)


def encode_action(action: Action) -> bytes:
    return _encoder.encode(action)


def decode_action(raw: bytes | str) -> AnyAction:
    try:
        action: AnyAction = _any_decoder.decode(raw)
        return action
    except (msgspec.DecodeError, RecursionError) as exc:  # DecodeError covers ValidationError
        raise MalformedAction(str(exc)) from None


def decode_callback(raw: bytes | str) -> Callback:
    """Decode what may arrive on a callback queue; anything else is malformed there."""
    try:
        callback: Callback = _callback_decoder.decode(raw)
        return callback
    except (msgspec.DecodeError, RecursionError) as exc:  # DecodeError covers ValidationError
        raise MalformedAction(str(exc)) from None


def _loose_json(raw: bytes | str) -> object | None:
    """Whatever JSON allows, as the stdlib reads it: a lone surrogate stays in its string,
    1e400 is infinity (msgspec refuses both). None when it is not JSON at all."""
    try:
        value: object = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and bad UTF-8 are ValueErrors
        return None
    return value


_FINAL_ANSWERS = frozenset({"execution.completed", "execution.failed", "execution.callback"})
MALFORMED_ANSWER = "malformed_answer"


def _carrier(value: object) -> dict[str, str]:
    """The trace context's string pairs that can be encoded again (no lone surrogate)."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if _encodable(k) and _encodable(v)}


def _encodable(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


class UnreadableAnswer(ExecutionFailed, kw_only=True, tag="execution.failed"):
    """The failure the worker makes of a final answer it could not read (never decoded from
    a stream). `attempt` 0 is the task's current attempt: the seed's `execution.callback`
    names none, nor does an answer whose `attempt` is missing or unreadable, and taking
    those for attempt 1 made the failure stale on a retried task, left to its deadline."""

    attempt: int = 0


def unreadable_answer_task(raw: bytes | str) -> str | None:
    """The task id a final answer that could not be decoded still names, if a valid one."""
    loose = _loose_json(raw)
    if not isinstance(loose, dict) or loose.get("action_type") not in _FINAL_ANSWERS:
        return None
    task_id = loose.get("task_id")
    return task_id if isinstance(task_id, str) and is_valid_id(task_id) else None


def loose_origin(raw: bytes | str | None) -> tuple[dict[str, str], dict[str, str]]:
    """The trace context and the valid ids (tenant, session, task) an action names, read as
    loosely as JSON allows: what a dead letter of an action that could not be read or
    applied still tells of the message it belonged to (its span joins that trace, its log
    line names the task)."""
    loose = None if raw is None else _loose_json(raw)
    if not isinstance(loose, dict):
        return {}, {}
    ids = {
        name: value
        for name in ("tenant_id", "session_id", "task_id")
        if isinstance(value := loose.get(name), str) and is_valid_id(value)
    }
    return _carrier(loose.get("trace_context")), ids


def failure_for_unreadable(
    raw: bytes | str, reason: str, located: tuple[str, str] | None = None
) -> UnreadableAnswer | None:
    """The failure that ends the task of a final answer that could not be decoded, when the
    answer still names its task. Dead-lettered alone, it left the task running until its
    deadline (minutes) with the client told nothing; now the client gets `chat.error`
    `malformed_answer` with the reason, and the dead letter keeps the answer.

    `located` is the (tenant, session) the task's id maps to (`keys.task_location`), for an
    answer that names its task but not (validly) its tenant or session: any it does name
    must agree. Read as loosely as JSON allows (`_loose_json`): the answers msgspec cannot
    read include valid JSON (a lone surrogate in its content, a cost of 1e400), and
    re-reading those with msgspec failed the same way, leaving their task to its deadline."""
    loose = _loose_json(raw)
    if not isinstance(loose, dict) or loose.get("action_type") not in _FINAL_ANSWERS:
        return None
    tenant_id, session_id = loose.get("tenant_id"), loose.get("session_id")
    if located is not None:
        if any(named is not None and named != real for named, real in zip(
            (tenant_id, session_id), located, strict=True
        )):  # fmt: skip
            return None  # it names another tenant's or session's task: leave it alone
        tenant_id, session_id = located
    attempt = loose.get("attempt")
    readable = isinstance(attempt, int) and not isinstance(attempt, bool) and attempt >= 1
    fields = {
        "tenant_id": tenant_id,
        "session_id": session_id,
        "task_id": loose.get("task_id"),
        "attempt": attempt if readable else 0,
        "trace_context": _carrier(loose.get("trace_context")),
        "error": f"the agent's answer could not be read: {reason}"[:500],
        "code": MALFORMED_ANSWER,
    }
    try:
        return msgspec.convert(fields, UnreadableAnswer)
    except msgspec.ValidationError:  # it does not name a task (ids missing or invalid)
        return None


def action_from_entry(fields: dict[bytes, bytes]) -> bytes:
    """The raw JSON of a stream entry; an entry without the `action` field is malformed."""
    raw = fields.get(ACTION_FIELD.encode())
    if raw is None:
        raise MalformedAction(f"stream entry has no '{ACTION_FIELD}' field")
    return raw

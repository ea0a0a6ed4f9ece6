"""Request and response bodies of the client API (DESIGN §3), shared by REST and the socket."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar._openapi.schema_generation import SchemaCreator
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Example, Schema
from litestar.typing import FieldDefinition

from services.core.ids import ID_PATTERN, PORTABLE_ID_PATTERN, Id
from services.core.tasks import TaskStatus

Message = Annotated[str, msgspec.Meta(min_length=1, description="the user's message")]


class SendRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A chat message. Unknown fields are refused so that a typo (`stram`) is not ignored."""

    message: Message
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    stream: bool = False
    agent_id: Id | None = None
    session_id: Id | None = None
    request_id: Id | None = None


class TaskRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    task_id: Id


class SocketCancel(TaskRequest, kw_only=True, forbid_unknown_fields=True):
    """A socket's `chat.cancel`: like a socket's `chat.send`, it may carry the `request_id` a
    refusal is answered with (it was refused as an unknown field, the task left running)."""

    request_id: Id | None = None


class Accepted(msgspec.Struct, kw_only=True):
    task_id: str
    status: TaskStatus
    session_id: str


class TaskView(msgspec.Struct, kw_only=True, omit_defaults=True):
    task_id: str
    status: TaskStatus
    created_at: str
    updated_at: str
    session_id: str | None = None
    agent_id: str | None = None
    attempt: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None


class Cancelled(msgspec.Struct, kw_only=True):
    task_id: str
    status: TaskStatus


# The read side's answers (services/api/history.py). Every field is always sent, `null` when
# it has no value, so none has a default: the document marks them all required (nullable
# where they can be null), and a generated client gets every field typed instead of `any`.
# The wire shape itself is made by `services.persistence.history` (`to_dict`); the field
# order here is its key order, so the bytes are what they were when the answers were dicts.


class MessageUsage(msgspec.Struct, kw_only=True):
    """What an answered task used; the user's message of a task carries none (`null`)."""

    input_tokens: int
    output_tokens: int
    model: str | None
    cost: float


class SessionMessage(msgspec.Struct, kw_only=True):
    """One message of a session's history: a task has a user message and, once answered,
    an assistant one (`message_id` is `<task_id>:<role>`). Times are ISO 8601 UTC."""

    message_id: str
    task_id: str
    role: Literal["user", "assistant"]
    agent_id: str
    user_id: str | None
    content: str
    status: Literal["completed", "failed", "cancelled", "timed_out"]
    final_event_id: str | None
    usage: MessageUsage | None
    created_at: str
    completed_at: str
    first_chunk_at: str | None
    # On the question of a task that did not complete: why, as its status says it.
    error: dict[str, Any] | None


class MessagePage(msgspec.Struct, kw_only=True):
    """A page of history, newest last; `next_cursor` pages on (null: no more), `pending`
    counts the session's ended tasks still on their way to PostgreSQL."""

    messages: list[SessionMessage]
    next_cursor: str | None
    pending: int


class SessionSummary(msgspec.Struct, kw_only=True):
    """One of the caller's sessions: the times (ISO 8601 UTC: when each message entered the
    history, its `completed_at`), the count and the title (the first message, at most 100
    characters) are of the caller's own messages in it."""

    session_id: str
    first_message_at: str
    last_message_at: str
    messages: int
    title: str


class SessionList(msgspec.Struct, kw_only=True):
    """A page of the caller's sessions, newest last message first; `next_cursor` pages on
    (null: no more)."""

    sessions: list[SessionSummary]
    next_cursor: str | None


class SessionErased(msgspec.Struct, kw_only=True):
    session_id: str
    deleted_messages: int


class DayUsage(msgspec.Struct, kw_only=True):
    """One UTC day of a tenant's use (`tokens` = input + output); days without use are absent."""

    day: str
    requests: int
    input_tokens: int
    output_tokens: int
    tokens: int
    cost: float


class TenantUsage(msgspec.Struct, kw_only=True):
    """The tenant's usage per day in [from, to] (YYYY-MM-DD, UTC)."""

    tenant_id: str
    day_from: str = msgspec.field(name="from")
    day_to: str = msgspec.field(name="to")
    days: list[DayUsage]


class ErrorDetail(msgspec.Struct, kw_only=True):
    code: str
    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorDetail


# The codes a client matches on, one per refusal status (README's error table): the examples
# the document shows for them. Litestar's generated ones were random strings.
STATUS_CODES = {
    400: "malformed_json",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "payload_too_large",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


# A status answered with more than one code: the operation's description names the one its
# example shows (a read's 400 is `bad_request`, a body's `malformed_json`).
OTHER_CODES = {400: ("bad_request",)}


def refusal(status: int, description: str) -> ResponseSpec:
    """One refusal as the api answers it: the one error shape, with a real code as example."""
    named = [code for code in OTHER_CODES.get(status, ()) if f"`{code}`" in description]
    code = named[0] if named and f"`{STATUS_CODES[status]}`" not in description else None
    code = code or STATUS_CODES[status]
    body = {"error": {"code": code, "message": description, "details": {}}}
    return ResponseSpec(
        ErrorBody,
        description=description,
        generate_examples=False,
        examples=[Example(summary=code, value=body)],
    )


def refusals(descriptions: dict[int, str]) -> dict[int, ResponseSpec]:
    """The `responses=` of an operation: every refusal it really sends, each in ErrorBody
    (Litestar's default 400 is `{status_code, detail, extra}`, a shape the api never sends)."""
    return {status: refusal(status, text) for status, text in descriptions.items()}


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """The API's structs as the document must show them: a struct that refuses unknown fields
    (422) says `additionalProperties: false`, and an id says the pattern every regex dialect
    reads (`PORTABLE_ID_PATTERN`: RE2 and Rust have no lookahead), while msgspec keeps
    checking the strict `ID_PATTERN` at runtime."""

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        if field_definition.type_.__struct_config__.forbid_unknown_fields:
            schema.additional_properties = False
        for prop in (schema.properties or {}).values():
            if isinstance(prop, Schema):
                portable_pattern(prop)
        return schema


def portable_pattern(schema: Schema) -> Schema:
    """`schema` with `ID_PATTERN` replaced by `PORTABLE_ID_PATTERN` (its `oneOf` arms too)."""
    if schema.pattern == ID_PATTERN:
        schema.pattern = PORTABLE_ID_PATTERN
    for arm in schema.one_of or []:
        if isinstance(arm, Schema):
            portable_pattern(arm)
    return schema

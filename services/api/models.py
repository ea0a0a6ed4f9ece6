"""Request and response bodies of the client API (DESIGN §3), shared by REST and the socket."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from services.core.ids import Id

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


class Accepted(msgspec.Struct, kw_only=True):
    task_id: str
    status: str
    session_id: str


class TaskView(msgspec.Struct, kw_only=True, omit_defaults=True):
    task_id: str
    status: str
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
    status: str


class ErrorDetail(msgspec.Struct, kw_only=True):
    code: str
    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorDetail

"""REST chat endpoints: send, status, task lookup, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.params import Parameter

from services.api.auth import header_id, pick
from services.api.models import (
    Accepted,
    Cancelled,
    ErrorBody,
    SendRequest,
    TaskRequest,
    TaskView,
)
from services.api.runtime import Runtime
from services.core.auth import Principal
from services.core.errors import BadRequest
from services.core.ids import ID_PATTERN, new_id

AnyRequest = Request[Any, Any, Any]


MAX_IDEMPOTENCY_KEY = 255


def idempotency_key(request: AnyRequest) -> str | None:
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    if not 0 < len(value) <= MAX_IDEMPOTENCY_KEY or not value.isprintable():
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters")
    return value


@post(
    "/api/chat/send",
    status_code=202,
    summary="Send a chat message",
    responses={429: ResponseSpec(ErrorBody, description="rate limited or over budget")},
)
async def send_message(
    data: SendRequest, principal: Principal, runtime: Runtime, request: AnyRequest
) -> Response[Accepted]:
    """Accept a message for the agent; events arrive on the session's socket.

    A repeated `Idempotency-Key` (per tenant, 24 hours) answers with the first task and
    enqueues nothing.
    """
    session_id = pick(data.session_id, header_id(request, "x-session-id"), "session_id")
    agent_id = pick(data.agent_id, header_id(request, "x-agent-id"), "agent_id")
    sent = await runtime.chat.send(
        principal,
        data,
        session_id=session_id or new_id(),
        agent_id=agent_id or runtime.settings.default_agent,
        idempotency_key=idempotency_key(request),
    )
    headers = dict(sent.headers)
    if sent.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(sent.accepted, status_code=202, headers=headers)


@post("/api/chat/status", status_code=200, summary="Status of a task")
async def task_status(data: TaskRequest, principal: Principal, runtime: Runtime) -> TaskView:
    return await runtime.chat.status(principal, data.task_id)


@get("/api/chat/tasks/{task_id:str}", summary="Status of a task")
async def get_task(
    task_id: Annotated[str, Parameter(pattern=ID_PATTERN, description="task id")],
    principal: Principal,
    runtime: Runtime,
) -> TaskView:
    return await runtime.chat.status(principal, task_id)


@post("/api/chat/cancel", status_code=200, summary="Cancel a task")
async def cancel_task(data: TaskRequest, principal: Principal, runtime: Runtime) -> Cancelled:
    """Cancel a task that is not final yet; 409 when it already is."""
    return await runtime.chat.cancel(principal, data.task_id)

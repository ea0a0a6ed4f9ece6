"""REST chat endpoints: send, status, task lookup, cancel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIHeader, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.openapi.spec import Parameter as HeaderParameter
from litestar.params import JSONBody, Parameter

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
from services.core.ids import ID_PATTERN

AnyRequest = Request[Any, Any, Any]


MAX_IDEMPOTENCY_KEY = 255

_ID = Schema(type=OpenAPIType.STRING, pattern=ID_PATTERN)
_SECONDS = Schema(type=OpenAPIType.INTEGER, minimum=0)
# The send's optional request headers: read and checked by our own code (`header_id`,
# `idempotency_key`), so that a bad value gets our error body, and documented here.
SEND_HEADERS = [
    HeaderParameter(
        name="Idempotency-Key",
        param_in="header",
        schema=Schema(type=OpenAPIType.STRING, min_length=1, max_length=MAX_IDEMPOTENCY_KEY),
        description="a repeated key of the same tenant within 24 hours answers with the "
        "first task (`Idempotent-Replayed: true`) and enqueues nothing",
    ),
    HeaderParameter(
        name="X-Session-ID",
        param_in="header",
        schema=_ID,
        description="the session, when the body has no `session_id` (they must agree)",
    ),
    HeaderParameter(
        name="X-Agent-ID",
        param_in="header",
        schema=_ID,
        description="the agent, when the body has no `agent_id` (they must agree)",
    ),
    HeaderParameter(
        name="X-Tenant-ID",
        param_in="header",
        schema=_ID,
        description="if given, must be the token's tenant (403 otherwise)",
    ),
]
RATE_HEADERS = {
    "RateLimit-Limit": OpenAPIHeader(
        schema=_SECONDS, description="requests per minute of the limit nearest exhaustion"
    ),
    "RateLimit-Remaining": OpenAPIHeader(
        schema=_SECONDS, description="requests left in its window"
    ),
    "RateLimit-Reset": OpenAPIHeader(schema=_SECONDS, description="seconds until it resets"),
}


@dataclass
class SendOperation(Operation):
    """The send's operation with the headers Litestar does not see: ours are read from the
    request by our own code, and its answers carry the rate-limit headers."""

    def __post_init__(self) -> None:
        self.parameters = [*(self.parameters or []), *SEND_HEADERS]
        responses = self.responses or {}
        accepted, refused = responses.get("202"), responses.get("429")
        if isinstance(accepted, OpenAPIResponse):
            accepted.headers = {
                **RATE_HEADERS,
                "Idempotent-Replayed": OpenAPIHeader(
                    schema=Schema(type=OpenAPIType.STRING, const="true"),
                    description="present when an Idempotency-Key repeated an earlier send",
                ),
            }
        if isinstance(refused, OpenAPIResponse):
            refused.headers = {
                **RATE_HEADERS,
                "Retry-After": OpenAPIHeader(
                    schema=_SECONDS, description="seconds to wait before sending again"
                ),
            }


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
    responses={
        401: ResponseSpec(ErrorBody, description="no token, or an expired or forged one"),
        403: ResponseSpec(
            ErrorBody,
            description=(
                "X-Tenant-ID is not the token's tenant, an unknown tenant (`unknown_tenant`), an "
                "agent the tier does not allow (`agent_not_allowed`), or streaming asked on a "
                "tier without it (`streaming_not_allowed`)"
            ),
        ),
        409: ResponseSpec(
            ErrorBody,
            description="the Idempotency-Key is being taken over by another request "
            "(`idempotency_conflict`): retry",
        ),
        413: ResponseSpec(ErrorBody, description="body over ORCHESTRATOR_MAX_BODY_BYTES"),
        422: ResponseSpec(
            ErrorBody,
            description="a field is missing, unknown or invalid (a message holding U+0000 "
            "included), the message is too long (`message_too_long`), or the Idempotency-Key "
            "was used for another request (`idempotency_key_reused`)",
        ),
        429: ResponseSpec(ErrorBody, description="rate limited or over budget"),
        503: ResponseSpec(ErrorBody, description="Redis unreachable or refusing writes: retry"),
    },
    operation_class=SendOperation,
)
async def send_message(
    data: JSONBody[SendRequest],
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
    request: AnyRequest,
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
        session_id=session_id,  # None: a new session (made by the service)
        agent_id=agent_id or runtime.settings.default_agent,
        idempotency_key=idempotency_key(request),
    )
    headers = dict(sent.headers)
    if sent.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(sent.accepted, status_code=202, headers=headers)


@post("/api/chat/status", status_code=200, summary="Status of a task")
async def task_status(
    data: JSONBody[TaskRequest],
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
) -> TaskView:
    return await runtime.chat.status(principal, data.task_id)


@get("/api/chat/tasks/{task_id:str}", summary="Status of a task")
async def get_task(
    task_id: Annotated[str, Parameter(pattern=ID_PATTERN, description="task id")],
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
) -> TaskView:
    return await runtime.chat.status(principal, task_id)


@post("/api/chat/cancel", status_code=200, summary="Cancel a task")
async def cancel_task(
    data: JSONBody[TaskRequest],
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
) -> Cancelled:
    """Cancel a task that is not final yet; 409 when it already is."""
    return await runtime.chat.cancel(principal, data.task_id)

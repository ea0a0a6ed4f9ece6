"""REST chat endpoints: send, status, task lookup, cancel."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIHeader, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.openapi.spec import Parameter as HeaderParameter
from litestar.params import JSONBody, Parameter

from services.api.auth import header_id, pick
from services.api.chat_service import SendAttempt, maybe_queued
from services.api.models import (
    Accepted,
    Cancelled,
    SendRequest,
    TaskRequest,
    TaskView,
    refusals,
)
from services.api.runtime import Runtime
from services.core.auth import Principal
from services.core.errors import BadRequest, Unavailable
from services.core.ids import ID_PATTERN, PORTABLE_ID_PATTERN

AnyRequest = Request[Any, Any, Any]


MAX_IDEMPOTENCY_KEY = 255

# The document shows the portable pattern; our code checks the strict one (`is_valid_id`).
_ID = Schema(type=OpenAPIType.STRING, pattern=PORTABLE_ID_PATTERN)
TENANT_HEADER = HeaderParameter(
    name="X-Tenant-ID",
    param_in="header",
    schema=_ID,
    description="if given, must be the token's tenant (403 otherwise)",
)
# For a path parameter: Litestar checks `ID_PATTERN`, the document shows the portable one.
PORTABLE: dict[str, Any] = {"pattern": PORTABLE_ID_PATTERN}
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
    TENANT_HEADER,
]
RATE_HEADERS = {
    "RateLimit-Limit": OpenAPIHeader(
        schema=_SECONDS,
        description="the limit nearest exhaustion: its requests per window, or, on a 429 "
        "`token_budget_exhausted`, the tenant's tokens per UTC day",
    ),
    "RateLimit-Remaining": OpenAPIHeader(
        schema=_SECONDS,
        description="requests left in its window (tokens left today: 0, for the budget)",
    ),
    "RateLimit-Reset": OpenAPIHeader(schema=_SECONDS, description="seconds until it resets"),
}
RETRY_AFTER = OpenAPIHeader(schema=_SECONDS, description="seconds to wait before sending again")


# What every operation behind a token may answer besides its own refusals.
UNAUTHORIZED = "no token, or an expired or forged one (`WWW-Authenticate: Bearer`)"
WRONG_TENANT = "X-Tenant-ID is not the token's tenant"
NOT_FOUND = "no such task of the caller's tenant"
INVALID_ID = "an id does not match [A-Za-z0-9_-]{1,64}"
MALFORMED = "the body is not JSON (`malformed_json`)"
TOO_LARGE = "body over ORCHESTRATOR_MAX_BODY_BYTES"
REDIS_DOWN = (
    "Redis unreachable or refusing writes, or the token's signing key not read yet from the "
    "identity provider (ORCHESTRATOR_JWT_JWKS_URL): retry (`Retry-After` when known)"
)
BAD_REQUEST = "a request the api cannot read (`bad_request`)"
TENANT_READS = (
    "the tenant's reads of persisted tasks, history and usage already hold their share of "
    "this server's database connections (`rate_limited`, `details.scope` `tenant_reads`): "
    "retry after `Retry-After`"
)


@dataclass
class AuthenticatedOperation(Operation):
    """An operation behind the token: it documents `X-Tenant-ID`, which `provide_principal`
    reads on every such route (a mismatch is 403), unseen by Litestar."""

    def __post_init__(self) -> None:
        self.parameters = [*(self.parameters or []), TENANT_HEADER]
        refused = (self.responses or {}).get("429")  # `TENANT_READS`: a generated client
        if isinstance(refused, OpenAPIResponse):  # gets a typed header to wait on
            refused.headers = {**(refused.headers or {}), "Retry-After": RETRY_AFTER}


@dataclass
class SendOperation(Operation):
    """The send's operation with the headers Litestar does not see: ours are read from the
    request by our own code, and its answers carry the rate-limit headers."""

    def __post_init__(self) -> None:
        self.parameters = [*(self.parameters or []), *SEND_HEADERS]
        responses = self.responses or {}
        accepted, refused = responses.get("202"), responses.get("429")
        unauthorized = responses.get("401")
        if isinstance(unauthorized, OpenAPIResponse):  # a page tells expired from missing
            unauthorized.headers = {
                "WWW-Authenticate": OpenAPIHeader(
                    schema=Schema(type=OpenAPIType.STRING),
                    description='`Bearer`, with `error="invalid_token"` when a token was given',
                )
            }
        if isinstance(accepted, OpenAPIResponse):
            accepted.headers = {
                **RATE_HEADERS,
                "Idempotent-Replayed": OpenAPIHeader(
                    schema=Schema(type=OpenAPIType.STRING, const="true"),
                    description="present when an Idempotency-Key repeated an earlier send",
                ),
            }
        if isinstance(refused, OpenAPIResponse):
            refused.headers = {**RATE_HEADERS, "Retry-After": RETRY_AFTER}


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
    responses=refusals(
        {
            400: "the body is not JSON (`malformed_json`), or a bad X-Session-ID, X-Agent-ID or "
            "Idempotency-Key, or body and header name different ids (`bad_request`)",
            401: UNAUTHORIZED,
            403: "X-Tenant-ID is not the token's tenant, an unknown tenant (`unknown_tenant`), "
            "an agent the tier does not allow (`agent_not_allowed`), or streaming asked on a "
            "tier without it (`streaming_not_allowed`)",
            409: "the Idempotency-Key is being taken over by another request "
            "(`idempotency_conflict`): retry; or its task was erased with its session "
            "(`conflict`)",
            413: TOO_LARGE,
            422: "a field is missing, unknown or invalid (a message holding U+0000 included), "
            "the message is too long (`message_too_long`), or the Idempotency-Key was used "
            "for another request (`idempotency_key_reused`)",
            429: "rate limited (`rate_limited`) or over the token budget "
            "(`token_budget_exhausted`)",
            503: REDIS_DOWN + "; a send Redis did not answer in time, or cut by the api's "
            "shutdown, names in `details.task_id` the task it may still become: check it "
            "before sending again",
        }
    ),
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
    attempt = SendAttempt()
    try:
        sent = await runtime.chat.send(
            principal,
            data,
            session_id=session_id,  # None: a new session (made by the service)
            agent_id=agent_id or runtime.settings.default_agent,
            idempotency_key=idempotency_key(request),
            attempt=attempt,
        )
    except asyncio.CancelledError:
        # Only uvicorn cancels a request: when its graceful shutdown ends with this one still
        # waiting on Redis. Its answer was a bare 500, and the client could not tell whether
        # the message was queued. It gets the 503 of a send Redis did not answer in time
        # (this request's task is at its end: nothing else waits for it to finish).
        if attempt.task_id is None:
            raise Unavailable("the api is stopping; the message was not queued") from None
        raise maybe_queued(attempt.task_id, "the api stopped before redis answered") from None
    headers = dict(sent.headers)
    if sent.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(sent.accepted, status_code=202, headers=headers)


@post(
    "/api/chat/status",
    status_code=200,
    summary="Status of a task",
    responses=refusals(
        {
            400: MALFORMED,
            401: UNAUTHORIZED,
            403: WRONG_TENANT,
            404: NOT_FOUND,
            429: TENANT_READS,
            413: TOO_LARGE,
            422: "task_id is missing, unknown fields, or " + INVALID_ID,
            503: REDIS_DOWN,
        }
    ),
    operation_class=AuthenticatedOperation,
)
async def task_status(
    data: JSONBody[TaskRequest],
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
) -> TaskView:
    return await runtime.chat.status(principal, data.task_id)


@get(
    "/api/chat/tasks/{task_id:str}",
    summary="Status of a task",
    responses=refusals(
        {
            400: BAD_REQUEST,
            401: UNAUTHORIZED,
            403: WRONG_TENANT,
            404: NOT_FOUND,
            429: TENANT_READS,
            422: INVALID_ID,
            503: REDIS_DOWN,
        }
    ),
    operation_class=AuthenticatedOperation,
)
async def get_task(
    task_id: Annotated[
        str, Parameter(pattern=ID_PATTERN, description="task id", schema_extra=PORTABLE)
    ],
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
) -> TaskView:
    return await runtime.chat.status(principal, task_id)


@post(
    "/api/chat/cancel",
    status_code=200,
    summary="Cancel a task",
    responses=refusals(
        {
            400: MALFORMED,
            401: UNAUTHORIZED,
            403: WRONG_TENANT,
            404: NOT_FOUND,
            429: TENANT_READS,
            409: "the task is already final (`conflict`)",
            413: TOO_LARGE,
            422: "task_id is missing, unknown fields, or " + INVALID_ID,
            503: REDIS_DOWN,
        }
    ),
    operation_class=AuthenticatedOperation,
)
async def cancel_task(
    data: JSONBody[TaskRequest],
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
) -> Cancelled:
    """Cancel a task that is not final yet; 409 when it already is."""
    return await runtime.chat.cancel(principal, data.task_id)

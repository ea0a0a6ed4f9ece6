"""Reading the durable record back: a session's history, its erasure, the tenant's usage.

Every query is scoped by the caller's tenant: another tenant's session does not exist (404).
`after_event_id` joins history to the socket's event ids, so a client told `resumed: false`
fetches exactly what it missed.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar import delete, get
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIType
from litestar.params import Parameter, QueryParameter

from services.api.chat import (
    BAD_REQUEST,
    PORTABLE,
    REDIS_DOWN,
    TENANT_READS,
    UNAUTHORIZED,
    WRONG_TENANT,
    AuthenticatedOperation,
)
from services.api.models import (
    MessagePage,
    SessionErased,
    SessionList,
    TenantUsage,
    refusals,
)
from services.api.runtime import Runtime
from services.core import clock, keys
from services.core.auth import Principal
from services.core.errors import NotFound, Unavailable
from services.core.ids import ID_PATTERN
from services.core.redis_client import REDIS_DOWN as REDIS_DOWN_ERRORS
from services.core.redis_client import REDIS_REFUSING
from services.core.settings import Settings
from services.persistence.history import DEFAULT_PAGE, HistoryStore, parse_day

SessionId = Annotated[
    str, Parameter(pattern=ID_PATTERN, description="session id", schema_extra=PORTABLE)
]
DEFAULT_USAGE_DAYS = 30
UNWRITTEN_WAIT_SECONDS = 2.0
UNWRITTEN_STALE_SECONDS = 60.0
UNWRITTEN_PUBLISH_SECONDS = 5.0
UNWRITTEN_POLL_SECONDS = 0.05
NO_HISTORY = (
    "PostgreSQL unreachable, or not configured (`persistence_not_configured`); " + REDIS_DOWN
)
NO_SESSION = "the tenant has no such session (none in the history, no task or event in Redis)"
# The page max the document shows: ORCHESTRATOR_HISTORY_PAGE_MAX's default. The api refuses
# (422) a limit over the configured value, which the document cannot know at import.
HISTORY_PAGE_MAX = int(Settings.model_fields["history_page_max"].default)
# `limit` as the document shows it. Its bounds are not Litestar constraints (`le=`) but the
# store's check, so that a limit over the page max keeps its own 422 (details `max`); a query
# value is never null, hence `integer` instead of Litestar's integer-or-null `oneOf`.
PageLimit = Annotated[
    int | None,
    Parameter(
        ge=1,
        description=f"page size: from 1 to ORCHESTRATOR_HISTORY_PAGE_MAX (default "
        f"{HISTORY_PAGE_MAX}); without it {DEFAULT_PAGE}, or the page max if smaller",
        schema_extra={
            "one_of": None,
            "type": OpenAPIType.INTEGER,
            "maximum": HISTORY_PAGE_MAX,
            "default": DEFAULT_PAGE,
        },
    ),
]


def _history(runtime: Runtime) -> HistoryStore:
    if runtime.history is None:
        raise Unavailable(
            "history needs PostgreSQL: set ORCHESTRATOR_DATABASE_URL",
            code="persistence_not_configured",
        )
    return runtime.history


@get(
    "/api/sessions/{session_id:str}/messages",
    summary="A session's history, newest last",
    responses=refusals(
        {
            400: "a cursor or after_event_id this api did not give (`bad_request`)",
            401: UNAUTHORIZED,
            403: WRONG_TENANT,
            429: TENANT_READS,
            404: NO_SESSION,
            422: "a bad session id, or limit out of range",
            503: NO_HISTORY,
        }
    ),
    operation_class=AuthenticatedOperation,
)
async def session_messages(
    session_id: SessionId,
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
    limit: PageLimit = None,
    cursor: Annotated[str | None, Parameter(description="next_cursor of a page")] = None,
    after_event_id: Annotated[
        str | None, Parameter(description="only messages finished after this event id")
    ] = None,
) -> MessagePage:
    history = _history(runtime)
    pending = await _unwritten(runtime, principal.tenant_id, session_id)
    page = await history.messages(
        principal.tenant_id, session_id, limit=limit, cursor=cursor, after_event_id=after_event_id
    )
    if (
        not page.messages
        and not pending
        and not await history.session_exists(principal.tenant_id, session_id)
        and not await _live(runtime, principal.tenant_id, session_id)
    ):
        raise NotFound(f"session {session_id} not found")
    # The store's dict is the wire shape; converting it checks it against the declared one.
    return msgspec.convert({**page.to_dict(), "pending": pending}, MessagePage)


@get(
    "/api/sessions",
    summary="The caller's sessions, newest first",
    responses=refusals(
        {
            400: "a cursor this api did not give (`bad_request`)",
            401: UNAUTHORIZED,
            403: WRONG_TENANT,
            429: TENANT_READS,
            422: "limit out of range",
            503: NO_HISTORY,
        }
    ),
    operation_class=AuthenticatedOperation,
)
async def user_sessions(
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
    limit: PageLimit = None,
    cursor: Annotated[str | None, Parameter(description="next_cursor of a page")] = None,
) -> SessionList:
    """The sessions in which the token's user (`sub`, within its tenant) has a message in
    the history, by their latest one, newest first: the list a chat client's sidebar shows,
    kept by the server instead of the browser's storage. Another user's sessions are not
    listed (a session id is all that stands between users of a tenant)."""
    history = _history(runtime)
    page = await history.sessions_of(
        principal.tenant_id, principal.user_id, limit=limit, cursor=cursor
    )
    return msgspec.convert(page.to_dict(), SessionList)


async def _live(runtime: Runtime, tenant_id: str, session_id: str) -> bool:
    """Whether the session has tasks or events in Redis: one whose first answer is still
    running has nothing in the history yet, and a page reload (or a second tab) loading it
    was answered 404, "conversation not found", for the conversation on the screen."""
    try:
        found = await runtime.redis.exists(  # one slot: both keys carry the session's tag
            keys.session_tasks(tenant_id, session_id), keys.session_log(tenant_id, session_id)
        )
    except (*REDIS_DOWN_ERRORS, *REDIS_REFUSING):
        return False  # cannot tell: the history's own answer stands
    return bool(found)


async def _unwritten(runtime: Runtime, tenant_id: str, session_id: str) -> int:
    """How many of the session's ended tasks are still on their way to PostgreSQL, after
    waiting up to UNWRITTEN_WAIT_SECONDS for them (the writer is usually within a second).

    History is written after the fact, so a page read while a record was on its way left its
    task out, and a cursor already past the task's place never returned it: a client told
    `resumed: false` got 200 with none of its missed tasks. Read once none is on its way,
    every task that had ended is in the page; `pending` says when some still were."""
    unwritten = keys.session_unwritten(tenant_id, session_id)
    deadline = asyncio.get_running_loop().time() + UNWRITTEN_WAIT_SECONDS
    while True:
        try:
            lost_before = await _lost_before(runtime)
            async with runtime.redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(unwritten, "-inf", lost_before)
                pipe.zcard(unwritten)
                _, pending = await pipe.execute()
        except (*REDIS_DOWN_ERRORS, *REDIS_REFUSING):
            return 0  # the history can still be read; only the wait is skipped
        if not pending or asyncio.get_running_loop().time() >= deadline:
            return int(pending)
        await asyncio.sleep(UNWRITTEN_POLL_SECONDS)  # a writer's commit has no event to await


async def _lost_before(runtime: Runtime) -> int:
    """The end time (ms, Redis's clock) before which a task still listed as on its way has
    lost its record (trimmed from the stream by PERSIST_STREAM_MAXLEN, dead-lettered
    unreadable, never published): every read waited 2 s for such a task, for an hour. A
    record is added to the stream right after its task's end: one that ended more than
    UNWRITTEN_PUBLISH_SECONDS before the oldest record still in the stream (or before now,
    when the stream is empty) is not coming; nor is one older than UNWRITTEN_STALE_SECONDS."""
    now_ms = int(clock.now() * 1000)
    oldest = await runtime.redis.xrange(keys.PERSIST_RECORDS, "-", "+", count=1)
    first: Any = oldest[0][0] if oldest else None
    text = first.decode() if isinstance(first, bytes) else str(first or "")
    horizon = int(text.split("-")[0]) if text else now_ms
    publish_ms = int(UNWRITTEN_PUBLISH_SECONDS * 1000)
    return max(now_ms - int(UNWRITTEN_STALE_SECONDS * 1000), min(horizon, now_ms) - publish_ms)


@delete(
    "/api/sessions/{session_id:str}",
    status_code=200,
    summary="Erase a session's history",
    responses=refusals(
        {
            400: BAD_REQUEST,
            401: UNAUTHORIZED,
            403: WRONG_TENANT,
            429: TENANT_READS,
            404: NO_SESSION + " (nothing left to erase)",
            422: "a bad session id",
            503: NO_HISTORY,
        }
    ),
    operation_class=AuthenticatedOperation,
)
async def erase_session(
    session_id: SessionId,
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
) -> SessionErased:
    """Deletes the persisted messages and the live event log, so a resume cannot replay
    what was erased; the tenant's usage stays counted."""
    history = _history(runtime)
    tenant_id = principal.tenant_id
    deleted = await history.delete_session(tenant_id, session_id, at=clock.utcnow())
    # The task states before the log: an erased task's later chunks are dropped, while one
    # applied between the log's delete and its task's would bring the log back.
    erased = await runtime.chat.erase_session(tenant_id, session_id)
    logged = await runtime.redis.exists(keys.session_log(tenant_id, session_id))
    if deleted or logged or erased:  # (an unknown session has no socket to tell)
        await runtime.chat.tell_sockets_session_erased(tenant_id, session_id)
    # The list of records on their way is not something left to erase: a retry re-queues the
    # records of the tasks an earlier erasure ended (the writer keeps one per task).
    await runtime.redis.delete(keys.session_log(tenant_id, session_id))
    await runtime.redis.delete(keys.session_unwritten(tenant_id, session_id))
    # Once more now: a task sent while the steps above ran, created after the first
    # tombstone, had its state erased by the second step but its history kept.
    deleted += await history.delete_session(tenant_id, session_id, at=clock.utcnow())
    if not deleted and not logged and not erased:
        raise NotFound(f"session {session_id} not found")
    return SessionErased(session_id=session_id, deleted_messages=deleted)


@get(
    "/api/usage",
    summary="The tenant's usage and cost per UTC day",
    responses=refusals(
        {
            400: BAD_REQUEST,
            401: UNAUTHORIZED,
            403: WRONG_TENANT,
            429: TENANT_READS,
            422: "from or to is not a YYYY-MM-DD day, or from is after to",
            503: NO_HISTORY,
        }
    ),
    operation_class=AuthenticatedOperation,
)
async def tenant_usage(
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
    day_from: Annotated[str | None, QueryParameter(name="from", description="YYYY-MM-DD")] = None,
    day_to: Annotated[str | None, QueryParameter(name="to", description="YYYY-MM-DD")] = None,
) -> TenantUsage:
    history = _history(runtime)
    today = datetime.now(UTC).date()
    last = parse_day(day_to, "to") if day_to else today
    span = timedelta(DEFAULT_USAGE_DAYS - 1)
    # (`last - span` would overflow for a `to` in the calendar's first month: a 500)
    first = parse_day(day_from, "from") if day_from else max(date.min + span, last) - span
    days = await history.usage(principal.tenant_id, first, last)
    return msgspec.convert(
        {
            "tenant_id": principal.tenant_id,
            "from": first.isoformat(),
            "to": last.isoformat(),
            "days": [day.to_dict() for day in days],
        },
        TenantUsage,
    )

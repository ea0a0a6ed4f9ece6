"""Reading the durable record back: a session's history, its erasure, the tenant's usage.

Every query is scoped by the caller's tenant: another tenant's session does not exist (404).
`after_event_id` joins history to the socket's event ids, so a client told `resumed: false`
fetches exactly what it missed.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from litestar import delete, get
from litestar.di import NamedDependency
from litestar.params import Parameter, QueryParameter

from services.api.runtime import Runtime
from services.core import keys
from services.core.auth import Principal
from services.core.errors import NotFound, Unavailable
from services.core.ids import ID_PATTERN
from services.persistence.history import HistoryStore, parse_day

SessionId = Annotated[str, Parameter(pattern=ID_PATTERN, description="session id")]
DEFAULT_USAGE_DAYS = 30


def _history(runtime: Runtime) -> HistoryStore:
    if runtime.history is None:
        raise Unavailable(
            "history needs PostgreSQL: set ORCHESTRATOR_DATABASE_URL",
            code="persistence_not_configured",
        )
    return runtime.history


@get("/api/sessions/{session_id:str}/messages", summary="A session's history, newest last")
async def session_messages(
    session_id: SessionId,
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
    limit: Annotated[
        int | None, Parameter(ge=1, description="page size (default 50, at most the page max)")
    ] = None,
    cursor: Annotated[str | None, Parameter(description="next_cursor of a page")] = None,
    after_event_id: Annotated[
        str | None, Parameter(description="only messages finished after this event id")
    ] = None,
) -> dict[str, Any]:
    history = _history(runtime)
    page = await history.messages(
        principal.tenant_id, session_id, limit=limit, cursor=cursor, after_event_id=after_event_id
    )
    if not page.messages and not await history.session_exists(principal.tenant_id, session_id):
        raise NotFound(f"session {session_id} not found")
    return page.to_dict()


@delete("/api/sessions/{session_id:str}", status_code=200, summary="Erase a session's history")
async def erase_session(
    session_id: SessionId,
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
) -> dict[str, Any]:
    """Deletes the persisted messages and the live event log, so a resume cannot replay
    what was erased; the tenant's usage stays counted."""
    history = _history(runtime)
    deleted = await history.delete_session(principal.tenant_id, session_id)
    # The task states before the log: an erased task's later chunks are dropped, while one
    # applied between the log's delete and its task's would bring the log back.
    erased = await runtime.chat.erase_session(principal.tenant_id, session_id)
    logged = await runtime.redis.delete(keys.session_log(principal.tenant_id, session_id))
    if not deleted and not logged and not erased:
        raise NotFound(f"session {session_id} not found")
    return {"session_id": session_id, "deleted_messages": deleted}


@get("/api/usage", summary="The tenant's usage and cost per UTC day")
async def tenant_usage(
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
    day_from: Annotated[str | None, QueryParameter(name="from", description="YYYY-MM-DD")] = None,
    day_to: Annotated[str | None, QueryParameter(name="to", description="YYYY-MM-DD")] = None,
) -> dict[str, Any]:
    history = _history(runtime)
    today = datetime.now(UTC).date()
    last = parse_day(day_to, "to") if day_to else today
    span = timedelta(DEFAULT_USAGE_DAYS - 1)
    # (`last - span` would overflow for a `to` in the calendar's first month: a 500)
    first = parse_day(day_from, "from") if day_from else max(date.min + span, last) - span
    days = await history.usage(principal.tenant_id, first, last)
    return {
        "tenant_id": principal.tenant_id,
        "from": first.isoformat(),
        "to": last.isoformat(),
        "days": [day.to_dict() for day in days],
    }
